"""verify_tree_sampling: lossless multi-branch speculative sampling over a token tree, in one launch.

One program per tree. The walk is sequential by nature (each acceptance test depends on the residual left
by the previous rejections), but it needs no vocabulary-sized work per test: with deterministic drafts the
residual is the verifier's distribution at the current node with the rejected tokens zeroed, so a test
reads one probability and updates the remaining mass. The vocabulary is scanned only when a node is
entered (its mass) and once at the end (inverse-CDF draw of the bonus token).
"""
import torch
import triton
import triton.language as tl

from ._common import tree_block
from .build_tree import ancestor_closure, node_depths
from .verify_tree_greedy import tree_outputs, trim_to_depth


@triton.jit
def row_mass(probs_row, V, stride_pv, BLOCK_V: tl.constexpr):
    total = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        vs = v0 + tl.arange(0, BLOCK_V)
        total += tl.load(probs_row + vs * stride_pv, mask=vs < V, other=0.0).to(tl.float32)
    return tl.sum(total, axis=0)


@triton.jit
def _verify_tree_sampling_kernel(
    draft_ptr, parents_ptr, probs_ptr, uniform_ptr, accept_nodes_ptr, accept_len_ptr, bonus_ptr, stats_ptr,
    N, V, stride_db, stride_pb, stride_qb, stride_qn, stride_qv, stride_ub,
    NP: tl.constexpr, LOG2_NP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    tree = tl.program_id(0)
    slots = tl.arange(0, NP)
    closure, parents = ancestor_closure(parents_ptr + tree * stride_pb, N, NP, LOG2_NP)
    tl.store(stats_ptr + tree, tl.max(tl.where(slots < N, node_depths(closure), 0), axis=0))
    probs = probs_ptr + tree * stride_qb
    uniform = uniform_ptr + tree * stride_ub
    out = accept_nodes_ptr + tree * N

    node = tl.full([], 0, tl.int32)
    depth = tl.full([], 0, tl.int32)
    mass = row_mass(probs, V, stride_qv, BLOCK_V)
    rejected = tl.full([NP], -1, tl.int32)  # tokens rejected at the current node, by child slot
    tl.store(out, 0)
    for child_index in range(1, N):
        child = tl.zeros([], tl.int32) + child_index  # a tensor in both compiled and interpreted runs
        parent = tl.load(parents_ptr + tree * stride_pb + child).to(tl.int32)
        token = tl.load(draft_ptr + tree * stride_db + child).to(tl.int32)
        p = tl.load(probs + node * stride_qn + token * stride_qv).to(tl.float32)
        weight = tl.where(tl.sum((rejected == token).to(tl.int32), axis=0) > 0, 0.0, p)
        is_child = parent == node
        accept = is_child & (tl.load(uniform + child).to(tl.float32) * mass < weight)
        reject = is_child & (~accept)
        mass = tl.where(reject, mass - weight, mass)
        rejected = tl.where(reject & (slots == child), token, rejected)
        if accept:
            node = child
            depth += 1
            tl.store(out + depth, child.to(tl.int64))
            mass = row_mass(probs + child * stride_qn, V, stride_qv, BLOCK_V)
            rejected = tl.full([NP], -1, tl.int32)
    tl.store(out + slots, tl.full([NP], -1, tl.int64), mask=(slots > depth) & (slots < N))
    tl.store(accept_len_ptr + tree, (depth + 1).to(tl.int64))

    # Bonus token: first index whose running residual sum exceeds u * mass (the last positive index if
    # rounding leaves none, token 0 if nothing is positive: nan rows), matching reference._sample_from.
    target = tl.load(uniform).to(tl.float32) * mass
    running = tl.zeros([], dtype=tl.float32)
    found = tl.full([], -1, tl.int32)
    last_positive = tl.full([], -1, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        vs = v0 + tl.arange(0, BLOCK_V)
        in_vocab = vs < V
        w = tl.load(probs + node * stride_qn + vs * stride_qv, mask=in_vocab, other=0.0).to(tl.float32)
        excluded = tl.sum((vs[:, None] == rejected[None, :]).to(tl.int32), axis=1) > 0
        w = tl.where(excluded, 0.0, w)
        cdf = tl.cumsum(w, axis=0) + running
        first = tl.min(tl.where(in_vocab & (cdf > target), vs, V), axis=0)
        found = tl.where((found < 0) & (first < V), first, found)
        last_positive = tl.maximum(last_positive, tl.max(tl.where(w > 0, vs, -1), axis=0))
        running += tl.sum(w, axis=0)
    tl.store(bonus_ptr + tree, tl.where(found >= 0, found, tl.maximum(last_positive, 0)).to(tl.int64))


def verify_tree_sampling(draft_tokens, parents, target_probs, uniform, max_depth=None):
    batch, n = parents.shape
    vocab = target_probs.shape[-1]
    accept_nodes, accept_len, bonus, tree_depth = tree_outputs(batch, n, parents.device)
    np_ = tree_block(n)
    _verify_tree_sampling_kernel[(batch,)](
        draft_tokens, parents, target_probs, uniform, accept_nodes, accept_len, bonus, tree_depth,
        n, vocab, draft_tokens.stride(0), parents.stride(0),
        target_probs.stride(0), target_probs.stride(1), target_probs.stride(2), uniform.stride(0),
        NP=np_, LOG2_NP=np_.bit_length() - 1, BLOCK_V=min(256, max(16, triton.next_power_of_2(vocab))),
        num_warps=4,
    )
    return trim_to_depth(accept_nodes, tree_depth, max_depth), accept_len, bonus
