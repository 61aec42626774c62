"""Build the optional C++ CPU ops (csrc/) as sdalign_rt._C.

The extension never blocks an install: without torch in the build environment, without a
compiler, or with SDALIGN_RT_NO_EXT=1, the package installs without it and sdalign_rt.ops
falls back to the reference implementation on CPU tensors.
"""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

PACKAGES = ["sdalign_rt", "sdalign_rt.models", "sdalign_rt.demo", "sdalign_rt.kernels", "sdalign_rt.vllm_plugin"]
# kernels/ is a top-level folder (the layout shows the architecture) installed as sdalign_rt.kernels
# so that the import name cannot clash with other distributions.
PACKAGE_DIR = {"sdalign_rt": "sdalign_rt", "sdalign_rt.kernels": "kernels"}


def _extension_setup():
    if os.environ.get("SDALIGN_RT_NO_EXT") == "1":
        print("sdalign_rt: SDALIGN_RT_NO_EXT=1, skipping the C++ extension", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch absent from an isolated build environment
        print(f"sdalign_rt: torch not importable at build time ({exc}); skipping the C++ extension",
              file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:
                print(f"sdalign_rt: C++ extension failed to build ({exc}); using reference ops",
                      file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                print(f"sdalign_rt: C++ extension failed to build ({exc}); using reference ops",
                      file=sys.stderr)

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    ext = CppExtension(
        "sdalign_rt._C",
        sources,
        # ATen's parallel_for is header code: without OpenMP it runs serially. GCC on Linux (torch's own OpenMP
        # there is libgomp); elsewhere the ops build without it and run on one thread.
        extra_compile_args={"cxx": ["-O3", "-std=c++17"] + (["-fopenmp"] if sys.platform.startswith("linux") else [])},
        extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
        py_limited_api=False,
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extension_setup()
if not ext_modules:
    cmdclass = {"build_ext": build_ext}

# The embedded default ships its trained adapter and tree plan (sdalign_rt/demo/shipped/provenance.json).
PACKAGE_DATA = {"sdalign_rt.demo": ["shipped/*.json", "shipped/*.safetensors", "eval_set.json", "train_set.json"]}

setup(packages=PACKAGES, package_dir=PACKAGE_DIR, package_data=PACKAGE_DATA, ext_modules=ext_modules,
      cmdclass=cmdclass)
