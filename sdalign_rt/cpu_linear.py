"""Linear layers on a few rows, on the CPU: the kernel that streams the weight fastest for each row count.

A decode step multiplies 1 to ~8 rows (the tree's nodes) by each weight matrix, so it should cost the time the
weight takes to stream from memory, whatever the row count. Measured on this project's 2-core CPU (fp32, weights
streamed as a forward streams them; bench/results/cpu_linear_cpu.json times every candidate): F.linear on one row
runs MKL's matrix-vector path at ~11 GB/s; `torch.mm(weight, rows.T)` on 2 rows runs MKL's small-N path at ~30
GB/s but slows from 3 rows on; the extension's `few_row_linear` (csrc/few_row_linear.cpp: each pair of weight rows
read once and multiplied with every row in registers) streams ~20-30 GB/s at any of 1 to 8 rows. So fp32 CPU
projections of 1-2 rows take `torch.mm` (one row duplicated to make two), 3-8 rows `few_row_linear` (over a
SmolLM2 layer's seven projections at 4 rows: 633 us against torch.mm's 726, though torch.mm still wins the
576 -> 1536 ones there), except 3-4 rows by a small model's LM head, tall and narrow, where MKL's small-N path stays
ahead (`torch.mm`); everything else takes the module itself; without the extension, 3-4 rows take `torch.mm`. Same
weights, same math; only the summation order inside the product differs, as it does between any two batch shapes.
SDALIGN_RT_CPU_LINEAR=module turns it all off.
"""
from __future__ import annotations

import os

import torch
from torch import nn

MAX_ROWS = 8  # past this the module's own GEMM (MKL's blocked path) is the right one
MM_ROWS = 2  # torch.mm's small-N path up to here (and as the fallback up to 4 without the extension)
TALL = 8192  # a weight at least this tall and at most NARROW wide (a small model's LM head) keeps torch.mm up to
NARROW = 1024  # MM_TALL_ROWS rows (SmolLM2's head: 4.1-4.7 ms there against 5.1-5.4; 4096-wide ones gain from few_row)
MM_TALL_ROWS = 4


_FEW_ROW: list = []  # the extension's op (or None without it), looked up once


def _few_row_op():
    if not _FEW_ROW:
        from sdalign_rt import _ext

        _FEW_ROW.append(_ext.cpp_op("few_row_linear") if _ext.cpp_available() and _ext.has_op("few_row_linear")
                        else None)
    return _FEW_ROW[0]


def enabled() -> bool:
    return os.environ.get("SDALIGN_RT_CPU_LINEAR", "fast") != "module"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K], weight [N, K], by the faster CPU GEMM where it applies."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (not 1 <= rows <= MAX_ROWS or x.device.type != "cpu" or x.dtype != torch.float32
            or weight.dtype != torch.float32 or not enabled()):
        return nn.functional.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    tall = weight.shape[0] >= TALL and weight.shape[1] <= NARROW
    # The extension's op has no backward: training through a projection takes torch.mm / F.linear.
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    few_row = None if rows <= MM_ROWS or (rows <= MM_TALL_ROWS and tall) or grad else _few_row_op()
    if few_row is not None:
        out = few_row(flat, weight)
    elif rows <= MM_TALL_ROWS or tall:
        if rows == 1:
            flat = flat.expand(2, -1)
        out = torch.mm(weight, flat.contiguous().T).T[:rows]  # [rows, N]; rows.T must be a transposed view
    else:
        return nn.functional.linear(x, weight, bias)
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
