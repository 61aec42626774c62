"""Backend selection: SDALIGN_RT_BACKEND, auto's choices, clear errors when a forced backend cannot run."""
import os
import subprocess
import sys

import pytest
import torch

import sdalign_rt as sd
from sdalign_rt import _ext, ops


def test_every_op_is_public():
    for name in ("fused_adapter", "cosine_accept", "adapter_cosine_accept", "build_tree", "verify_tree_greedy",
                 "verify_tree_sampling", "kv_compact"):
        assert callable(getattr(sd.ops, name))


def test_auto_picks_cpp_for_cpu_tree_ops_and_reference_for_dense_ops():
    with ops.use_backend("auto"):
        cpu = torch.device("cpu")
        expected = "cpp" if _ext.cpp_available() else "reference"
        assert ops.resolve_backend("build_tree", cpu, has_cpp=True) == expected
        assert ops.resolve_backend("fused_adapter", cpu, has_cpp=False) == "reference"


def test_auto_falls_back_to_reference_without_the_extension(monkeypatch):
    monkeypatch.setattr(_ext, "_loaded", False)
    monkeypatch.setattr(_ext, "load_error", "ImportError: not built")
    with ops.use_backend("auto"):
        assert ops.resolve_backend("build_tree", torch.device("cpu"), has_cpp=True) == "reference"
        masks = sd.ops.build_tree(torch.tensor([[-1, 0, 0]]), 0)
    assert masks.retrieve.tolist() == [[[0, 1], [0, 2]]]
    with ops.use_backend("cpp"), pytest.raises(RuntimeError, match="C\\+\\+ extension is not built"):
        sd.ops.build_tree(torch.tensor([[-1, 0, 0]]), 0)


def test_env_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("SDALIGN_RT_BACKEND", "reference")
    assert ops.get_backend() == "reference"
    monkeypatch.setenv("SDALIGN_RT_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="SDALIGN_RT_BACKEND must be one of"):
        ops.get_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("fastest")


def test_use_backend_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("SDALIGN_RT_BACKEND", "triton")
    with ops.use_backend("reference"):
        assert ops.get_backend() == "reference"
    assert ops.get_backend() == "triton"


def test_forced_triton_without_interpreter_or_gpu_is_an_error():
    """In a fresh process without TRITON_INTERPRET, CPU tensors cannot run the kernels: say so."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SDALIGN_RT_BACKEND"] = "triton"
    code = ("import torch, sdalign_rt as sd\n"
            "try:\n    sd.ops.build_tree(torch.tensor([[-1, 0]]), 0)\n"
            "except RuntimeError as e:\n    print('error:', e)\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "needs CUDA tensors, or TRITON_INTERPRET=1" in result.stdout, result.stderr


def test_tree_kernel_size_limit(device):
    if "triton" not in sd.ops.available_backends(device):
        pytest.skip("triton backend not available")
    parents = torch.arange(-1, 128).view(1, -1).to(device)  # a chain of 129 nodes
    with ops.use_backend("triton"), pytest.raises(ValueError, match="129 tree nodes > 128"):
        sd.ops.build_tree(parents, 0)
    with ops.use_backend("auto"):  # auto serves large trees from another backend
        assert sd.ops.build_tree(parents, 0).retrieve.shape == (1, 1, 129)


def test_mixed_devices_are_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    with pytest.raises(ValueError, match="must be on one device"):
        sd.ops.cosine_accept(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4, device="cuda"))
