"""Linear layers on a few rows, on the CPU: the GEMM orientation that streams the weight fastest.

A decode step multiplies 1 to ~4 rows by each weight matrix, so it is bound by how fast the weight streams
from memory. Measured on this project's 2-core CPU (MKL, fp32, bench/results/cpu_linear_cpu.json): F.linear
on one row runs MKL's matrix-vector path at ~9 GB/s, while weight @ rows.T with 2 to 4 rows runs its
small-N matrix-matrix path at ~20 GB/s; from ~5 rows on both cost about the same on a layer's matrices, but on
a vocabulary-sized head (8192 to 49152 rows) the small-N path stays 2-3x faster up to 8 rows (a tree of 5-8
nodes: 5.2 against 16.5 ms for SmolLM2's head at 5 rows). So fp32 CPU projections of 1-4 rows, and of 5-8 rows
by a weight of at least 8192 rows, go through `torch.mm(weight, rows.T)` (one row is duplicated to make two),
everything else through the module itself. Same weights, same math; only the summation order inside the GEMM differs, as it does
between any two batch shapes. SDALIGN_RT_CPU_LINEAR=module turns it off.
"""
from __future__ import annotations

import os

import torch
from torch import nn

MAX_ROWS = 4  # past this MKL's small-N path loses its edge on a layer's matrices (see the module docstring)
MAX_ROWS_TALL = 8  # ... and this far it keeps it on a weight of at least TALL rows (LM heads)
TALL = 8192


def enabled() -> bool:
    return os.environ.get("SDALIGN_RT_CPU_LINEAR", "fast") != "module"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K], weight [N, K], by the faster CPU GEMM where it applies."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    most = MAX_ROWS_TALL if weight.shape[0] >= TALL else MAX_ROWS
    if (not 1 <= rows <= most or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32 or not enabled()):
        return nn.functional.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:
        flat = flat.expand(2, -1)
    out = torch.mm(weight, flat.contiguous().T).T[:rows]  # [rows, N]; rows.T must be a transposed view
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for a projection: plain nn.Linear layers without hooks take `linear`, anything else
    (bitsandbytes 4-bit layers, accelerate-dispatched or hooked modules) runs as itself."""
    if (type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks
            and not hasattr(module, "_hf_hook")):
        return linear(x, module.weight, module.bias)
    return module(x)
