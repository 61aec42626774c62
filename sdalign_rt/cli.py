"""The sdalign-rt command line."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys


def _info(args) -> int:
    import torch

    from sdalign_rt import __version__, _ext, ops

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {
        "sdalign_rt": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpp_extension": "built" if _ext.cpp_available() else f"absent ({_ext.load_error})",
        "backend_setting": ops.get_backend(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "backends": {d: ops.available_backends(d) for d in devices},
    }
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdalign-rt", description="Speculative decoding between different "
                                     "multimodal models: runtime and tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, the C++ extension and the backends each device can use")
    info.set_defaults(run=_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
