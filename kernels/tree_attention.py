"""tree_attention: decode-time attention over a static KV cache that reads only the slots a row uses.

Row b's queries see its committed slots [start_b, length_b) and, over the W slots from offset_b, whatever the
tree block says (block[b, t, j] for slot offset_b + j; it overrides the committed rule there). A program never
touches a slot outside [min(start_b, offset_b), max(length_b, offset_b + W)): the cost follows the committed
length, not the cache's capacity, and no dense [T, capacity] mask exists. Lengths are read on the device, so
one launch shape serves every step (CUDA graphs).

Split-K (flash-decoding): grid (B * H_kv, SPLITS). A program takes one KV head and all G * T queries of its G
query heads (grouped-query heads read their shared K/V once), walks its share of the row's slot range in
BLOCK_S chunks with an online softmax and writes a partial (max, sum, weighted values); a second launch merges
the SPLITS partials by log-sum-exp. Masked scores are a large negative constant rather than -inf, so a chunk or
split that sees nothing gets weight exp(-huge) = 0 instead of nan; every query sees itself, so no row is empty.
"""
import torch
import triton
import triton.language as tl

from ._common import dot_precision, next_pow2, upcast_dot_operands

MASKED = tl.constexpr(-1.0e30)  # a jit function may read a global only as a constexpr
MAX_QUERY_ROWS = 128  # G * T per program: beyond this the caller uses SDPA (prefill, very wide trees)


@triton.jit
def _partial_kernel(
    q_ptr, k_ptr, v_ptr, start_ptr, length_ptr, offset_ptr, block_ptr,
    m_ptr, l_ptr, acc_ptr,
    H_KV, T, W, G, Dh, SPLITS, scale,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sv_b, sv_h, sv_s, sv_d,
    sblk_b, sblk_t, sblk_w,
    BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // H_KV
    kv_head = pid % H_KV
    rows = tl.arange(0, BLOCK_Q)  # r = g * T + t
    g = rows // T
    t = rows % T
    row_ok = rows < G * T
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < Dh
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + (kv_head * G + g)[:, None] * sq_h + t[:, None] * sq_t
                + ds[None, :] * sq_d, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    start = tl.load(start_ptr + b)
    length = tl.load(length_ptr + b)
    offset = tl.load(offset_ptr + b)
    lo = tl.minimum(start, offset)
    hi = tl.maximum(length, offset + W)
    chunk = tl.cdiv(tl.cdiv(hi - lo, SPLITS), BLOCK_S) * BLOCK_S
    my_lo = lo + split * chunk
    my_hi = tl.minimum(my_lo + chunk, hi)
    k_base = k_ptr + b.to(tl.int64) * sk_b + kv_head.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + kv_head.to(tl.int64) * sv_h
    m_i = tl.zeros([BLOCK_Q], tl.float32) + MASKED
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    if UPCAST:
        q = q.to(tl.float32)
    for s0 in range(my_lo, my_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < my_hi
        kv_mask = s_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + s[:, None].to(tl.int64) * sk_s + ds[None, :] * sk_d, mask=kv_mask, other=0.0)
        v = tl.load(v_base + s[:, None].to(tl.int64) * sv_s + ds[None, :] * sv_d, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_Q, BLOCK_S] fp32
        committed = (s >= start) & (s < length)
        j = s - offset
        in_block = (j >= 0) & (j < W) & s_ok
        seen = tl.load(block_ptr + b.to(tl.int64) * sblk_b + t[:, None] * sblk_t + j[None, :] * sblk_w,
                       mask=row_ok[:, None] & in_block[None, :], other=0)
        visible = tl.where(in_block[None, :], seen != 0, committed[None, :]) & s_ok[None, :] & row_ok[:, None]
        scores = tl.where(visible, scores, MASKED)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out_row = pid.to(tl.int64) * G * T + rows  # (b * H_kv + kv_head) * G * T + r
    tl.store(m_ptr + out_row * SPLITS + split, m_i, mask=row_ok)
    tl.store(l_ptr + out_row * SPLITS + split, l_i, mask=row_ok)
    tl.store(acc_ptr + (out_row[:, None] * SPLITS + split) * Dh + ds[None, :], acc,
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, SPLITS, Dh,
                  BLOCK_SPLIT: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # = (b * H + head) * T + t: out is [B, H, T, Dh] contiguous
    splits = tl.arange(0, BLOCK_SPLIT)
    s_ok = splits < SPLITS
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < Dh
    m = tl.load(m_ptr + row * SPLITS + splits, mask=s_ok, other=MASKED)
    l = tl.load(l_ptr + row * SPLITS + splits, mask=s_ok, other=0.0)
    acc = tl.load(acc_ptr + (row * SPLITS + splits[:, None]) * Dh + ds[None, :], mask=s_ok[:, None] & d_ok[None, :],
                  other=0.0)
    weight = tl.exp(m - tl.max(m, 0))
    out = tl.sum(weight[:, None] * acc, 0) / tl.sum(weight * l, 0)
    tl.store(out_ptr + row * Dh + ds, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def splits_for(batch: int, kv_heads: int, capacity: int, device: torch.device) -> int:
    """Enough programs to cover the chip about twice, no split under 64 slots of the capacity (fixed per cache,
    so a captured graph keeps its launch shape)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(triton.cdiv(2 * sms, batch * kv_heads), triton.cdiv(capacity, 64), 32))


def tree_attention(q, keys, values, starts, lengths, block, offset, scale: float) -> torch.Tensor:
    """Launch on validated inputs: q [B, H, T, Dh], keys / values [B, H_kv, S, Dh], starts / lengths / offset [B]
    int64, block [B or 1, T, W] bool. Returns [B, H, T, Dh] in q's dtype."""
    batch, heads, tokens, head_dim = q.shape
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    width = block.shape[-1]
    splits = splits_for(batch, kv_heads, capacity, q.device)
    rows = batch * heads * tokens
    m = torch.empty(rows, splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(rows, splits, head_dim, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, heads, tokens, head_dim, dtype=q.dtype, device=q.device)
    block_q = max(16, next_pow2(group * tokens))
    block_d = max(16, next_pow2(head_dim))
    block_s = 64 if block_q <= 64 else 32
    seen = block.view(torch.uint8) if block.dtype == torch.bool else block
    _partial_kernel[(batch * kv_heads, splits)](
        q, keys, values, starts, lengths, offset, seen, m, l, acc,
        kv_heads, tokens, width, group, head_dim, splits, scale,
        *q.stride(), *keys.stride(), *values.stride(),
        seen.stride(0) if seen.shape[0] > 1 else 0, seen.stride(1), seen.stride(2),
        BLOCK_Q=block_q, BLOCK_S=block_s, BLOCK_D=block_d, PRECISION=dot_precision(q.dtype),
        UPCAST=upcast_dot_operands(q.dtype), num_warps=4,
    )
    _merge_kernel[(rows,)](m, l, acc, out, splits, head_dim, BLOCK_SPLIT=max(2, next_pow2(splits)),
                           BLOCK_D=block_d, num_warps=1 if head_dim <= 128 else 2)
    return out
