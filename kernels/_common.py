"""Helpers shared by the launchers: block-size choices and dtype mapping."""
import os

import torch
import triton


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def tree_block(n: int) -> int:
    """Tile width for the tree kernels: a power of two >= 32 so a row packs into whole int32 words."""
    return max(32, next_pow2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands get IEEE dots (no silent tf32 rounding); 16-bit operands use tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def upcast_dot_operands(dtype: torch.dtype) -> bool:
    """Triton's interpreter mis-multiplies bf16 dot operands; bf16 x bf16 products are exact in fp32, so
    upcasting there is the same arithmetic. Compiled kernels keep bf16 tensor-core dots."""
    return interpreting() and dtype == torch.bfloat16
