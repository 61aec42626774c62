"""kv_compact: move the accepted tree slots of every layer's K and V to the front, in one launch.

Tree node i was written at cache slot prefix_len + i; the k-th accepted node moves to prefix_len + k.
Sources never precede their destinations (accepted node indices strictly increase, so node_k >= k), and
one program moves one (cache, batch, head) row sequence in increasing k with the same thread owning the
same Dh element throughout, so the in-place moves need no barrier or scratch copy.
"""
import torch
import triton
import triton.language as tl

from ._common import next_pow2


@triton.jit
def _kv_compact_kernel(
    cache_ptr, accept_ptr, prefix_ptr, new_len_ptr,
    B, H, M, Dh,
    stride_c, stride_b, stride_h, stride_s, stride_d, stride_ab,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    head = pid % H
    batch = (pid // H) % B
    layer = pid // (H * B)
    base = cache_ptr + layer.to(tl.int64) * stride_c + batch.to(tl.int64) * stride_b + head * stride_h
    prefix = tl.load(prefix_ptr + batch)
    ds = tl.arange(0, BLOCK_D)
    d_mask = ds < Dh
    accepted = 0
    for k in range(0, M):
        node = tl.load(accept_ptr + batch * stride_ab + k)
        # Broadcast the scalar test through an int add: the interpreter rejects a vector & scalar-bool mask.
        move = d_mask & ((tl.zeros([BLOCK_D], tl.int32) + ((node >= 0) & (node != k)).to(tl.int32)) > 0)
        row = tl.load(base + (prefix + node) * stride_s + ds * stride_d, mask=move)
        tl.store(base + (prefix + k) * stride_s + ds * stride_d, row, mask=move)
        accepted += (node >= 0).to(tl.int32)
    if (layer == 0) & (head == 0):
        tl.store(new_len_ptr + batch, prefix + accepted)


def kv_compact(cache: torch.Tensor, accept_nodes: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
    """Launch on a validated cache view [C, B, H, S, Dh] (C = every layer's K and V)."""
    caches, batch, heads, _, head_dim = cache.shape
    new_len = torch.empty(batch, dtype=torch.int64, device=cache.device)
    _kv_compact_kernel[(caches * batch * heads,)](
        cache, accept_nodes, prefix_len, new_len,
        batch, heads, accept_nodes.shape[1], head_dim,
        *cache.stride(), accept_nodes.stride(0),
        BLOCK_D=next_pow2(head_dim), num_warps=1 if head_dim <= 128 else 2,
    )
    return new_len
