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


def _generate(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sdalign_rt as sd

    for name, path in (("--target", args.target), ("--draft", args.draft), ("--adapter", args.adapter)):
        if path is not None and not os.path.isdir(path):
            raise SystemExit(f"sdalign-rt generate: {name} {path!r} is not a directory")
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).to(args.device).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=dtype).to(args.device).eval()
    adapter = (sd.BottleneckAdapter.from_pretrained(args.adapter, dtype=dtype, device=args.device)
               if args.adapter else None)
    decoder = sd.SpeculativeDecoder(target=target, draft=draft, adapter=adapter, mode=args.mode,
                                    tree=sd.TreeSpec.parse(args.tree), feature_threshold=args.threshold,
                                    draft_layers=args.draft_layers, pad_token_id=tokenizer.pad_token_id)
    batch = tokenizer(args.prompt, return_tensors="pt", padding=True).to(args.device)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    out = decoder.generate(batch.input_ids, args.max_new_tokens, attention_mask=batch.attention_mask,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator)
    texts = tokenizer.batch_decode(out.sequences[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    for prompt, text in zip(args.prompt, texts):
        print(f"### {prompt}\n{text}")
    report = {"mode": args.mode, "tree": args.tree, "texts": texts, "stats": out.stats}
    print(json.dumps(report["stats"], indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdalign-rt", description="Speculative decoding between different "
                                     "multimodal models: runtime and tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, the C++ extension and the backends each device can use")
    info.set_defaults(run=_info)

    gen = commands.add_parser("generate", help="speculative decoding with local checkpoints (shared vocabulary)")
    gen.add_argument("--target", required=True, help="verifier checkpoint directory (transformers layout)")
    gen.add_argument("--draft", required=True, help="drafter checkpoint directory")
    gen.add_argument("--adapter", default=None, help="BottleneckAdapter directory (aligned drafting)")
    gen.add_argument("--tree", default="chain:4", help="chain:DEPTH | static:CHOICES_JSON_OR_FILE | "
                     "dynamic:TOP_K,DEPTH,TOTAL (default chain:4)")
    gen.add_argument("--mode", default="greedy", choices=["greedy", "sample", "feature"])
    gen.add_argument("--threshold", type=float, default=0.9, help="feature mode's cosine threshold")
    gen.add_argument("--draft-layers", type=int, default=None,
                     help="draft from the drafter's first K decoder layers only (shallow drafting)")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--json", default=None, help="also write texts and stats here")
    gen.set_defaults(run=_generate)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
