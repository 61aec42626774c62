"""verify_tree_greedy: accept the deepest tree path whose drafts match the verifier's argmax, in one launch.

One program per tree, no pointer chasing: a node is accepted iff no node on its root path (itself included)
mismatches, i.e. iff its ancestor-closure row misses every mismatching node; the winner is the accepted
node with the largest (depth, -index) key, and its path is read off its closure row by depth.
"""
import torch
import triton
import triton.language as tl

from ._common import tree_block
from .build_tree import ancestor_closure, node_depths


@triton.jit
def emit_path(closure, node, depth, out_row, width, NP: tl.constexpr):
    """Store the root-to-`node` path into out_row[0:width] (node indices by depth, -1 after)."""
    nodes = tl.arange(0, NP)
    on_path = tl.max(tl.where(nodes[:, None] == node, closure.to(tl.int32), 0), axis=0) > 0
    slots = tl.sum(tl.where(on_path[:, None] & (depth[:, None] == nodes[None, :]), nodes[:, None] + 1, 0), axis=0)
    tl.store(out_row + nodes, (slots - 1).to(tl.int64), mask=nodes < width)


@triton.jit
def _verify_tree_greedy_kernel(
    draft_ptr, parents_ptr, argmax_ptr, accept_nodes_ptr, accept_len_ptr, bonus_ptr, stats_ptr,
    N, stride_db, stride_pb, stride_ab,
    NP: tl.constexpr, LOG2_NP: tl.constexpr,
):
    tree = tl.program_id(0)
    closure, parents = ancestor_closure(parents_ptr + tree * stride_pb, N, NP, LOG2_NP)
    nodes = tl.arange(0, NP)
    valid = nodes < N
    depth = node_depths(closure)
    argmax_row = argmax_ptr + tree * stride_ab
    draft = tl.load(draft_ptr + tree * stride_db + nodes, mask=valid, other=0)
    expected = tl.load(argmax_row + parents, mask=valid & (parents >= 0), other=0)
    mismatch = valid & (parents >= 0) & (draft != expected)
    accepted = valid & (tl.sum((closure & mismatch[None, :]).to(tl.int32), axis=1) == 0)
    key = tl.where(accepted, depth * NP + (NP - 1 - nodes), -1)
    best_key = tl.max(key, axis=0)
    best = NP - 1 - best_key % NP
    best_depth = best_key // NP
    emit_path(closure, best, depth, accept_nodes_ptr + tree * N, N, NP)
    tl.store(accept_len_ptr + tree, (best_depth + 1).to(tl.int64))
    tl.store(bonus_ptr + tree, tl.load(argmax_row + best).to(tl.int64))
    tl.store(stats_ptr + tree, tl.max(tl.where(valid, depth, 0), axis=0))


def tree_outputs(batch: int, n: int, device):
    return (
        torch.empty(batch, n, dtype=torch.int64, device=device),
        torch.empty(batch, dtype=torch.int64, device=device),
        torch.empty(batch, dtype=torch.int64, device=device),
        torch.empty(batch, dtype=torch.int32, device=device),
    )


def trim_to_depth(accept_nodes: torch.Tensor, tree_depth: torch.Tensor, max_depth):
    """accept_nodes is written N wide; the contract is max_depth + 1 wide. Given max_depth, no sync."""
    if max_depth is None:
        max_depth = int(tree_depth.max())
    return accept_nodes[:, : max_depth + 1]


def verify_tree_greedy(draft_tokens, parents, target_argmax, max_depth=None):
    batch, n = parents.shape
    accept_nodes, accept_len, bonus, tree_depth = tree_outputs(batch, n, parents.device)
    np_ = tree_block(n)
    _verify_tree_greedy_kernel[(batch,)](
        draft_tokens, parents, target_argmax, accept_nodes, accept_len, bonus, tree_depth,
        n, draft_tokens.stride(0), parents.stride(0), target_argmax.stride(0),
        NP=np_, LOG2_NP=np_.bit_length() - 1, num_warps=4 if np_ <= 64 else 8,
    )
    return trim_to_depth(accept_nodes, tree_depth, max_depth), accept_len, bonus
