"""fused_adapter: y = x + gelu(x @ w_down.T + b_down) @ w_up.T + b_up.

Many rows (one launch): each program owns BLOCK_M rows. Phase 1 streams x and w_down over D and keeps the
[BLOCK_M, R] bottleneck activation in registers (R <= 512); phase 2 streams w_up over D in BLOCK_N chunks and
writes y once, with the residual and bias added in fp32. The bottleneck never touches memory.

Decode sizes (few rows, split): one program per row block would stream all 2 x R x D weights (4 MB at 7B
dims) through one SM. There, phase 1 runs one program per (row block, BLOCK_RS bottleneck columns) and writes
the tiny activation [M, R] to memory; phase 2 runs one program per (row block, BLOCK_N output columns), each
reading its own rows of w_up. Every weight byte is read once, by programs spread over the chip; no reduction
crosses programs, so the result is deterministic. Register budget: R <= 512 and D <= 8192 (sdalign_rt.ops
enforces both before launching).
"""
import torch
import triton
import triton.language as tl

from ._common import dot_precision, next_pow2, upcast_dot_operands


@triton.jit
def bottleneck_activation(
    x_ptr, stride_xm, stride_xd, rows, row_mask,
    wd_ptr, stride_wdr, stride_wdd, bd_ptr,
    D, R, r0,
    HAS_BD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """gelu(x[rows] @ w_down[r0:r0+BLOCK_R].T + b_down) as fp32 [BLOCK_M, BLOCK_R]; columns >= R are exactly 0."""
    rs = r0 + tl.arange(0, BLOCK_R)
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
                              wd_ptr, stride_wdr, stride_wdd, bd_ptr, D, R, 0,
                              HAS_BD, BLOCK_M, BLOCK_K, BLOCK_R, PRECISION, UPCAST)
    h = h.to(wu_ptr.dtype.element_ty)
    for n0 in range(0, D, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_mask = ns < D
        y = adapter_output_chunk(h, x_ptr, stride_xm, stride_xd, rows, row_mask, ns, n_mask,
                                 wu_ptr, stride_wud, stride_wur, bu_ptr, R, HAS_BU, BLOCK_R, PRECISION, UPCAST)
        tl.store(y_ptr + rows[:, None] * stride_ym + ns[None, :] * stride_yd,
                 y.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _bottleneck_kernel(
    x_ptr, wd_ptr, bd_ptr, h_ptr,
    M, D, R,
    stride_xm, stride_xd, stride_wdr, stride_wdd,
    HAS_BD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_RS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Split phase 1: h[rows, r0:r0+BLOCK_RS] = gelu(x @ w_down.T + b_down), stored in h's dtype (w_up's)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    r0 = tl.program_id(1) * BLOCK_RS
    h = bottleneck_activation(x_ptr, stride_xm, stride_xd, rows, row_mask,
                              wd_ptr, stride_wdr, stride_wdd, bd_ptr, D, R, r0,
                              HAS_BD, BLOCK_M, BLOCK_K, BLOCK_RS, PRECISION, UPCAST)
    rs = r0 + tl.arange(0, BLOCK_RS)
    tl.store(h_ptr + rows[:, None] * R + rs[None, :], h.to(h_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (rs < R)[None, :])


@triton.jit
def _adapter_up_kernel(
    x_ptr, h_ptr, wu_ptr, bu_ptr, y_ptr,
    M, D, R,
    stride_xm, stride_xd, stride_wud, stride_wur, stride_ym, stride_yd,
    HAS_BU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Split phase 2: y[rows, ns] = x + h @ w_up[ns].T + b_up for one BLOCK_N chunk of output columns."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = ns < D
    rs = tl.arange(0, BLOCK_R)
    h = tl.load(h_ptr + rows[:, None] * R + rs[None, :], mask=row_mask[:, None] & (rs < R)[None, :], other=0.0)
    y = adapter_output_chunk(h, x_ptr, stride_xm, stride_xd, rows, row_mask, ns, n_mask,
                             wu_ptr, stride_wud, stride_wur, bu_ptr, R, HAS_BU, BLOCK_R, PRECISION, UPCAST)
    tl.store(y_ptr + rows[:, None] * stride_ym + ns[None, :] * stride_yd,
             y.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


# Up to this many rows the split launch wins: few row blocks would leave most SMs idle while one program
# streams all the weights (bench/bench_kernels.py times both as "triton" and "triton_fused").
SPLIT_MAX_ROWS = 128
BLOCK_RS = 16  # bottleneck columns per phase-1 program (tl.dot's minimum tile)


def adapter_blocks(rows: int, bottleneck: int) -> dict:
    """Block sizes: 16-row tiles for decode-sized inputs, wider D chunks when R is small (register budget)."""
    block_r = max(16, next_pow2(bottleneck))
    return {
        "BLOCK_M": 16 if rows <= 16 else 32,
        "BLOCK_K": 64 if block_r <= 256 else 32,
        "BLOCK_N": 64 if block_r <= 256 else 32,
        "BLOCK_R": block_r,
    }


def use_split(rows: int, split: bool | None) -> bool:
    return rows <= SPLIT_MAX_ROWS if split is None else split


def fused_adapter(x: torch.Tensor, w_down, b_down, w_up, b_up, split: bool | None = None) -> torch.Tensor:
    """Launch on validated input: x[..., D] (any strides), weights [R, D] / [D, R]. split: the two-launch
    decode-size path (None: by row count)."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows == 0:
        return y.view(x.shape)
    if use_split(rows, split):
        split_adapter(x2, w_down, b_down, w_up, b_up, y)
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


def split_adapter(x2: torch.Tensor, w_down, b_down, w_up, b_up, y: torch.Tensor) -> None:
    """The decode-size path into y [M, D] (x2 [M, D], any strides): phase 1 over bottleneck slices, phase 2
    over output chunks."""
    rows, hidden = x2.shape
    bottleneck = w_down.shape[0]
    blocks = adapter_blocks(rows, bottleneck)
    h = torch.empty(rows, bottleneck, dtype=w_up.dtype, device=x2.device)
    precision, upcast = dot_precision(w_down.dtype), upcast_dot_operands(w_down.dtype)
    row_blocks = triton.cdiv(rows, blocks["BLOCK_M"])
    _bottleneck_kernel[(row_blocks, triton.cdiv(bottleneck, BLOCK_RS))](
        x2, w_down, b_down if b_down is not None else w_down, h,
        rows, hidden, bottleneck,
        x2.stride(0), x2.stride(1), w_down.stride(0), w_down.stride(1),
        HAS_BD=b_down is not None, BLOCK_M=blocks["BLOCK_M"], BLOCK_K=128, BLOCK_RS=BLOCK_RS,
        PRECISION=precision, UPCAST=upcast, num_warps=4,
    )
    _adapter_up_kernel[(row_blocks, triton.cdiv(hidden, blocks["BLOCK_N"]))](
        x2, h, w_up, b_up if b_up is not None else w_up, y,
        rows, hidden, bottleneck,
        x2.stride(0), x2.stride(1), w_up.stride(0), w_up.stride(1), y.stride(0), y.stride(1),
        HAS_BU=b_up is not None, BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"], BLOCK_R=blocks["BLOCK_R"],
        PRECISION=precision, UPCAST=upcast, num_warps=8 if blocks["BLOCK_R"] > 256 else 4,
    )
