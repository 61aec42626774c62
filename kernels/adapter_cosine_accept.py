"""adapter_cosine_accept: fused_adapter on the drafter's hidden states and cosine_accept against the
verifier's, in one launch.

One program per batch row: for each tile of positions it builds the bottleneck activation in registers,
writes each adapted chunk once (it is what the verifier's LM head reads next), and folds that same chunk,
rounded to the output dtype exactly as stored, into the cosine sums.

Decode sizes (B x T <= SPLIT_MAX_ROWS): one program per batch row would stream all the adapter's weights
through one SM, so the adapter runs split over the chip (fused_adapter's decode path) and cosine_accept reads
the adapted states back (tiny, and still in L2): three launches, each weight byte read once.
"""
import torch
import triton
import triton.language as tl

from ._common import dot_precision, upcast_dot_operands
from .cosine_accept import accept_epilogue, accept_outputs, accumulate_cosine_sums, cosine_accept
from .fused_adapter import adapter_blocks, adapter_output_chunk, bottleneck_activation, split_adapter, use_split


@triton.jit
def _adapter_cosine_accept_kernel(
    a_ptr, b_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, y_ptr, sims_ptr, accept_ptr, n_accept_ptr,
    T, D, R, threshold,
    stride_ab, stride_at, stride_ad, stride_bb, stride_bt, stride_bd,
    stride_wdr, stride_wdd, stride_wud, stride_wur,
    HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, CONSECUTIVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    batch = tl.program_id(0)
    a_row = a_ptr + batch * stride_ab
    b_row = b_ptr + batch * stride_bb
    y_row = y_ptr + batch * T * D  # y is a fresh contiguous [B, T, D]
    run_end = T
    count = 0
    for t0 in range(0, T, BLOCK_M):
        ts = t0 + tl.arange(0, BLOCK_M)
        t_mask = ts < T
        h = bottleneck_activation(a_row, stride_at, stride_ad, ts, t_mask, wd_ptr, stride_wdr, stride_wdd,
                                  bd_ptr, D, R, 0, HAS_BD, BLOCK_M, BLOCK_K, BLOCK_R, PRECISION, UPCAST)
        h = h.to(wu_ptr.dtype.element_ty)
        dot = tl.zeros([BLOCK_M], dtype=tl.float32)
        sq_a = tl.zeros([BLOCK_M], dtype=tl.float32)
        sq_b = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in range(0, D, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            n_mask = ns < D
            m = t_mask[:, None] & n_mask[None, :]
            y = adapter_output_chunk(h, a_row, stride_at, stride_ad, ts, t_mask, ns, n_mask,
                                     wu_ptr, stride_wud, stride_wur, bu_ptr, R, HAS_BU, BLOCK_R, PRECISION,
                                     UPCAST)
            y = y.to(y_ptr.dtype.element_ty)
            tl.store(y_row + ts[:, None] * D + ns[None, :], y, mask=m)
            y = tl.where(m, y.to(tl.float32), 0.0)
            b = tl.load(b_row + ts[:, None] * stride_bt + ns[None, :] * stride_bd, mask=m, other=0.0).to(tl.float32)
            dot, sq_a, sq_b = accumulate_cosine_sums(y, b, dot, sq_a, sq_b)
        run_end, count = accept_epilogue(dot, sq_a, sq_b, ts, t_mask, threshold, sims_ptr + batch * T,
                                         accept_ptr + batch * T, run_end, count, T, CONSECUTIVE)
    tl.store(n_accept_ptr + batch, run_end if CONSECUTIVE else count)


def adapter_cosine_accept(a, b, w_down, b_down, w_up, b_up, threshold: float, mode: str,
                          split: bool | None = None):
    """Launch on validated input: a, b [B, T, D] (any strides), weights [R, D] / [D, R]. split: the decode-size
    path (None: by row count)."""
    batch, positions, hidden = a.shape
    adapted = torch.empty(batch, positions, hidden, dtype=a.dtype, device=a.device)
    if positions == 0:
        sims, accept, n_accept = accept_outputs(batch, positions, a.device)
        return adapted, sims, accept, n_accept.zero_()
    if use_split(batch * positions, split):
        split_adapter(a.reshape(-1, hidden), w_down, b_down, w_up, b_up, adapted.view(-1, hidden))
        return (adapted, *cosine_accept(adapted, b, threshold, mode))
    sims, accept, n_accept = accept_outputs(batch, positions, a.device)
    blocks = adapter_blocks(positions, w_down.shape[0])
    _adapter_cosine_accept_kernel[(batch,)](
        a, b, w_down, b_down if b_down is not None else w_down, w_up, b_up if b_up is not None else w_up,
        adapted, sims, accept.view(torch.int8), n_accept,
        positions, hidden, w_down.shape[0], threshold,
        a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
        w_down.stride(0), w_down.stride(1), w_up.stride(0), w_up.stride(1),
        HAS_BD=b_down is not None, HAS_BU=b_up is not None, CONSECUTIVE=mode == "consecutive",
        PRECISION=dot_precision(w_down.dtype), UPCAST=upcast_dot_operands(w_down.dtype),
        num_warps=8 if blocks["BLOCK_R"] > 256 else 4, **blocks,
    )
    return adapted, sims, accept, n_accept
