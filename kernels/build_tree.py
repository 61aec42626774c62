"""build_tree: depth, positions, ancestor mask, packed bitmask and root-to-leaf paths in one launch.

One program per tree. The ancestor-or-self matrix is the transitive closure of (I + parent adjacency);
instead of chasing parent pointers (one dependent memory load per level), it is built in registers by
log2(NP) boolean squarings with tl.dot on 0/1 fp16 tiles (exact: counts stay far below 2048). The NP x NP
fp32 accumulator bounds trees to 128 nodes (sdalign_rt.ops serves larger ones from another backend).
"""
import torch
import triton
import triton.language as tl

from ._common import tree_block


@triton.jit
def ancestor_closure(parents_row, N, NP: tl.constexpr, LOG2_NP: tl.constexpr):
    """(closure[NP, NP] bool with closure[i, j] = j is i or an ancestor of i, parents[NP] int32)."""
    nodes = tl.arange(0, NP)
    valid = nodes < N
    parents = tl.load(parents_row + nodes, mask=valid, other=-1).to(tl.int32)
    step = (parents[:, None] == nodes[None, :]) | ((nodes[:, None] == nodes[None, :]) & valid[:, None])
    closure = step.to(tl.float16)
    for _ in tl.static_range(LOG2_NP):
        closure = tl.minimum(tl.dot(closure, closure, out_dtype=tl.float32), 1.0).to(tl.float16)
    return closure > 0, parents


@triton.jit
def node_depths(closure):
    return tl.sum(closure.to(tl.int32), axis=1) - 1


@triton.jit
def _build_tree_kernel(
    parents_ptr, prefix_ptr, positions_ptr, depth_ptr, mask_ptr, bitmask_ptr, retrieve_ptr, stats_ptr,
    N, W, stride_pb,
    NP: tl.constexpr, LOG2_NP: tl.constexpr,
):
    tree = tl.program_id(0)
    closure, parents = ancestor_closure(parents_ptr + tree * stride_pb, N, NP, LOG2_NP)
    nodes = tl.arange(0, NP)
    valid = nodes < N
    pair_valid = valid[:, None] & valid[None, :]
    depth = node_depths(closure)

    prefix = tl.load(prefix_ptr + tree)
    tl.store(depth_ptr + tree * N + nodes, depth.to(tl.int64), mask=valid)
    tl.store(positions_ptr + tree * N + nodes, prefix + depth.to(tl.int64), mask=valid)
    tl.store(mask_ptr + tree * N * N + nodes[:, None] * N + nodes[None, :], closure.to(tl.int8), mask=pair_valid)

    # Bits of distinct columns never carry, so a sum of shifted bits is their OR.
    bits = closure.to(tl.uint32) << (nodes[None, :] % 32).to(tl.uint32)
    words = tl.sum(tl.reshape(bits, (NP, NP // 32, 32)), axis=2)
    word_ids = tl.arange(0, NP // 32)
    tl.store(bitmask_ptr + tree * N * W + nodes[:, None] * W + word_ids[None, :], words.to(tl.int32, bitcast=True),
             mask=valid[:, None] & (word_ids < W)[None, :])

    # Leaves (no child), ranked in node order; each leaf's path is read off its closure row by depth:
    # path[i, d] = 1 + the node j on i's path with depth d, as a 0/1 x (j + 1) dot.
    has_child = tl.max(((parents[:, None] == nodes[None, :]) & valid[:, None]).to(tl.int32), axis=0)
    is_leaf = valid & (has_child == 0)
    rank = tl.sum(((nodes[None, :] < nodes[:, None]) & is_leaf[None, :]).to(tl.int32), axis=1)
    by_depth = tl.where(depth[:, None] == nodes[None, :], nodes[:, None] + 1, 0).to(tl.float16)
    path = tl.dot(closure.to(tl.float16), by_depth, out_dtype=tl.float32).to(tl.int64) - 1
    tl.store(retrieve_ptr + tree * N * N + rank[:, None] * N + nodes[None, :], path,
             mask=is_leaf[:, None] & valid[None, :])
    n_leaves = tl.sum(is_leaf.to(tl.int32), axis=0)
    tl.store(retrieve_ptr + tree * N * N + nodes[:, None] * N + nodes[None, :], tl.full([NP, NP], -1, tl.int64),
             mask=pair_valid & (nodes >= n_leaves)[:, None])
    tl.store(stats_ptr + tree * 2, n_leaves)
    tl.store(stats_ptr + tree * 2 + 1, tl.max(tl.where(valid, depth, 0), axis=0))


def build_tree(parents: torch.Tensor, prefix_len: torch.Tensor, num_leaves=None, max_depth=None):
    """Launch on validated input. Returns (positions, mask, bitmask, retrieve, depth).

    retrieve's shape depends on the data (leaf count, depth): unless the caller knows both, reading them is
    the one host sync.
    """
    batch, n = parents.shape
    device = parents.device
    np_ = tree_block(n)
    words = (n + 31) // 32
    positions = torch.empty(batch, n, dtype=torch.int64, device=device)
    depth = torch.empty(batch, n, dtype=torch.int64, device=device)
    mask = torch.empty(batch, 1, n, n, dtype=torch.bool, device=device)
    bitmask = torch.empty(batch, n, words, dtype=torch.int32, device=device)
    retrieve = torch.empty(batch, n, n, dtype=torch.int64, device=device)
    stats = torch.empty(batch, 2, dtype=torch.int32, device=device)
    _build_tree_kernel[(batch,)](
        parents, prefix_len, positions, depth, mask.view(torch.int8), bitmask, retrieve, stats,
        n, words, parents.stride(0),
        NP=np_, LOG2_NP=np_.bit_length() - 1, num_warps=4 if np_ <= 64 else 8,
    )
    if num_leaves is None:
        num_leaves, max_depth = (int(v) for v in stats.max(0).values.tolist())
    return positions, mask, bitmask, retrieve[:, :num_leaves, : max_depth + 1], depth
