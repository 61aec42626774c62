"""cosine_accept: row cosine similarity, threshold test and accepted count in one launch.

One program per batch row walks its T positions in BLOCK_T tiles and D in BLOCK_D chunks, keeping the
three fp32 dot products per row in registers, so the count of accepted positions (consecutive or relaxed)
is finished in the same program without a second pass.
"""
import torch
import triton
import triton.language as tl

from ._common import next_pow2


@triton.jit
def accumulate_cosine_sums(a, b, dot, sq_a, sq_b):
    """Add one [rows, D-chunk] tile's contribution to the per-row a.b, a.a and b.b sums (fp32)."""
    return dot + tl.sum(a * b, axis=1), sq_a + tl.sum(a * a, axis=1), sq_b + tl.sum(b * b, axis=1)


@triton.jit
def accept_epilogue(dot, sq_a, sq_b, ts, t_mask, threshold, sims_ptr, accept_ptr, run_end, count, T,
                    CONSECUTIVE: tl.constexpr):
    """Store sims/accept for one tile of positions; return the updated (first rejected position, count)."""
    norm_a = tl.sqrt(sq_a)
    norm_b = tl.sqrt(sq_b)
    nonzero = (norm_a != 0) & (norm_b != 0)  # nan norms stay "nonzero": nan sims are never accepted
    sims = tl.where(nonzero, dot / tl.where(nonzero, norm_a, 1.0) / tl.where(nonzero, norm_b, 1.0), 0.0)
    sims = tl.minimum(tl.maximum(sims, -1.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                      propagate_nan=tl.PropagateNan.ALL)
    accept = sims >= threshold
    tl.store(sims_ptr + ts, sims, mask=t_mask)
    tl.store(accept_ptr + ts, accept.to(tl.int8), mask=t_mask)
    if CONSECUTIVE:
        run_end = tl.minimum(run_end, tl.min(tl.where(t_mask & ~accept, ts, T), axis=0))
    else:
        count += tl.sum((t_mask & accept).to(tl.int32), axis=0)
    return run_end, count


@triton.jit
def _cosine_accept_kernel(
    a_ptr, b_ptr, sims_ptr, accept_ptr, n_accept_ptr,
    T, D, threshold,
    stride_ab, stride_at, stride_ad, stride_bb, stride_bt, stride_bd,
    CONSECUTIVE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    batch = tl.program_id(0)
    a_row = a_ptr + batch * stride_ab
    b_row = b_ptr + batch * stride_bb
    run_end = T
    count = 0
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        t_mask = ts < T
        dot = tl.zeros([BLOCK_T], dtype=tl.float32)
        sq_a = tl.zeros([BLOCK_T], dtype=tl.float32)
        sq_b = tl.zeros([BLOCK_T], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            m = t_mask[:, None] & (ds < D)[None, :]
            a = tl.load(a_row + ts[:, None] * stride_at + ds[None, :] * stride_ad, mask=m, other=0.0).to(tl.float32)
            b = tl.load(b_row + ts[:, None] * stride_bt + ds[None, :] * stride_bd, mask=m, other=0.0).to(tl.float32)
            dot, sq_a, sq_b = accumulate_cosine_sums(a, b, dot, sq_a, sq_b)
        run_end, count = accept_epilogue(dot, sq_a, sq_b, ts, t_mask, threshold, sims_ptr + batch * T,
                                         accept_ptr + batch * T, run_end, count, T, CONSECUTIVE)
    tl.store(n_accept_ptr + batch, run_end if CONSECUTIVE else count)


def accept_outputs(batch: int, positions: int, device):
    sims = torch.empty(batch, positions, dtype=torch.float32, device=device)
    accept = torch.empty(batch, positions, dtype=torch.bool, device=device)
    n_accept = torch.empty(batch, dtype=torch.int64, device=device)
    return sims, accept, n_accept


def cosine_accept(a: torch.Tensor, b: torch.Tensor, threshold: float, mode: str):
    """Launch on validated input a, b [B, T, D] (any strides)."""
    batch, positions, hidden = a.shape
    sims, accept, n_accept = accept_outputs(batch, positions, a.device)
    if positions == 0:
        return sims, accept, n_accept.zero_()
    _cosine_accept_kernel[(batch,)](
        a, b, sims, accept.view(torch.int8), n_accept,
        positions, hidden, threshold,
        a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
        CONSECUTIVE=mode == "consecutive", BLOCK_T=min(16, max(2, next_pow2(positions))),
        BLOCK_D=min(512, max(16, next_pow2(hidden))),
    )
    return sims, accept, n_accept
