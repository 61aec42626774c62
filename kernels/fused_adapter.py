"""fused_adapter: y = x + gelu(x @ w_down.T + b_down) @ w_up.T + b_up in one launch.

Each program owns BLOCK_M rows. Phase 1 streams x and w_down over D and keeps the [BLOCK_M, R] bottleneck
activation in registers (R <= 512); phase 2 streams w_up over D in BLOCK_N chunks and writes y once, with
the residual and bias added in fp32. The bottleneck never touches memory. Register budget: R <= 512 and
D <= 8192 (sdalign_rt.ops enforces both before launching).
"""
import torch
import triton
import triton.language as tl

from ._common import dot_precision, next_pow2, upcast_dot_operands


@triton.jit
def bottleneck_activation(
    x_ptr, stride_xm, stride_xd, rows, row_mask,
    wd_ptr, stride_wdr, stride_wdd, bd_ptr,
    D, R,
    HAS_BD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """gelu(x[rows] @ w_down.T + b_down) as fp32 [BLOCK_M, BLOCK_R]; columns >= R are exactly 0."""
    rs = tl.arange(0, BLOCK_R)
    r_mask = rs < R
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xd,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(wd_ptr + rs[:, None] * stride_wdr + ks[None, :] * stride_wdd,
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        x = x.to(w.dtype)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BD:
        acc += tl.load(bd_ptr + rs, mask=r_mask, other=0.0).to(tl.float32)[None, :]
    return 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))


@triton.jit
def adapter_output_chunk(
    h, x_ptr, stride_xm, stride_xd, rows, row_mask, ns, n_mask,
    wu_ptr, stride_wud, stride_wur, bu_ptr, R,
    HAS_BU: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """fp32 y[rows, ns] = x + h @ w_up[ns].T + b_up[ns] for a bottleneck activation h already in w_up's dtype."""
    rs = tl.arange(0, BLOCK_R)
    w = tl.load(wu_ptr + ns[:, None] * stride_wud + rs[None, :] * stride_wur,
                mask=n_mask[:, None] & (rs < R)[None, :], other=0.0)
    if UPCAST:
        h = h.to(tl.float32)
        w = w.to(tl.float32)
    y = tl.dot(h, tl.trans(w), input_precision=PRECISION)
    y += tl.load(x_ptr + rows[:, None] * stride_xm + ns[None, :] * stride_xd,
                 mask=row_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
    if HAS_BU:
        y += tl.load(bu_ptr + ns, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _fused_adapter_kernel(
    x_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, y_ptr,
    M, D, R,
    stride_xm, stride_xd, stride_wdr, stride_wdd, stride_wud, stride_wur, stride_ym, stride_yd,
    HAS_BD: tl.constexpr, HAS_BU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    h = bottleneck_activation(x_ptr, stride_xm, stride_xd, rows, row_mask,
                              wd_ptr, stride_wdr, stride_wdd, bd_ptr, D, R,
                              HAS_BD, BLOCK_M, BLOCK_K, BLOCK_R, PRECISION, UPCAST)
    h = h.to(wu_ptr.dtype.element_ty)
    for n0 in range(0, D, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_mask = ns < D
        y = adapter_output_chunk(h, x_ptr, stride_xm, stride_xd, rows, row_mask, ns, n_mask,
                                 wu_ptr, stride_wud, stride_wur, bu_ptr, R, HAS_BU, BLOCK_R, PRECISION, UPCAST)
        tl.store(y_ptr + rows[:, None] * stride_ym + ns[None, :] * stride_yd,
                 y.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def adapter_blocks(rows: int, bottleneck: int) -> dict:
    """Block sizes: 16-row tiles for decode-sized inputs, wider D chunks when R is small (register budget)."""
    block_r = max(16, next_pow2(bottleneck))
    return {
        "BLOCK_M": 16 if rows <= 16 else 32,
        "BLOCK_K": 64 if block_r <= 256 else 32,
        "BLOCK_N": 64 if block_r <= 256 else 32,
        "BLOCK_R": block_r,
    }


def fused_adapter(x: torch.Tensor, w_down, b_down, w_up, b_up) -> torch.Tensor:
    """Launch on validated input: x[..., D] (any strides), weights [R, D] / [D, R]."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows == 0:
        return y.view(x.shape)
    blocks = adapter_blocks(rows, w_down.shape[0])
    grid = (triton.cdiv(rows, blocks["BLOCK_M"]),)
    _fused_adapter_kernel[grid](
        x2, w_down, b_down if b_down is not None else w_down, w_up, b_up if b_up is not None else w_up, y,
        rows, hidden, w_down.shape[0],
        x2.stride(0), x2.stride(1), w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
        y.stride(0), y.stride(1),
        HAS_BD=b_down is not None, HAS_BU=b_up is not None,
        PRECISION=dot_precision(w_down.dtype), UPCAST=upcast_dot_operands(w_down.dtype), num_warps=8 if blocks["BLOCK_R"] > 256 else 4,
        **blocks,
    )
    return y.view(x.shape)
