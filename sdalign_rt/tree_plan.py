"""TreePlan: everything a static tree's shape fixes, built once per TreeSpec, device and dtype.

Plan once, run many: the per-step path only indexes these tensors, so no step builds a mask, computes a
depth or reads a node count back to the host. Worked example, choices [(0,), (1,), (0, 0)]:

    node      0 (root)  1 (0,)  2 (1,)  3 (0, 0)
    parents   -1        0       0       1
    depths    0         1       1       2          -> verifier positions length + [0, 1, 1, 2]
    ranks     -1        0       1       0          (sibling rank: 0 is the drafter's top token)
    levels    [(0, 1), (1, 3), (3, 4)]             (node ranges per depth: BFS order)
    expanded  [[0], [1], []]                       (nodes with children: the drafter runs only those)
    block     row 3 sees nodes 0, 1, 3             (additive: 0 there, dtype min elsewhere)
    drafted   offsets [0, 1, -1, -1]                (node 1 at offset 1 of the drafter's tree region; leaves: -1)
    leaves    [2, 3]                                (never run by the drafter: layer reuse runs their first layers)

A context-lookup chain (TreeSpec.with_lookup) follows the drafter's nodes: its nodes are leaves to the drafter
(never run, offset -1, layer reuse runs their first layers), `lookup` is their (first, end), and `levels`,
`expanded` and `parent_in_level` describe the drafter's nodes alone (their depth is `draft_depth`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sdalign_rt import ops
from sdalign_rt.kv_cache import additive
from sdalign_rt.trees import TreeSpec


@dataclass(frozen=True)
class TreePlan:
    nodes: int  # N, the root included
    depth: int
    parents: torch.Tensor  # [B, N] int64 (contiguous, as the verification ops take it)
    depths: torch.Tensor  # [1, N] int64
    ranks: torch.Tensor  # [1, N] int64, -1 at the root
    block: torch.Tensor  # [1, N, N] additive: node i sees itself and its ancestors
    levels: tuple  # per depth: (first node, end) of its nodes, host ints
    expanded: tuple  # per depth d < depth: [w_d] the level's nodes that have children (the drafter runs those)
    parent_in_level: tuple  # per depth d >= 1: [n_d] each node's parent's index within expanded[d - 1]
    children_needed: tuple  # per depth d >= 1: how many top tokens the expanded nodes of d - 1 must provide
    drafter_offsets: torch.Tensor  # [1, N]: where the drafter's tree region holds node i (-1: never run)
    leaves: torch.Tensor  # [n_leaves] the nodes the drafter never runs (no children); layer reuse runs only these
    leaf_block: torch.Tensor  # [1, n_leaves, N] their rows of `block`
    draft_depth: int = 0  # the drafter's levels (depth counts the lookup chain too)
    lookup: tuple = (0, 0)  # (first, end) of the context-lookup nodes, host ints

    @classmethod
    def build(cls, spec: TreeSpec, device, dtype: torch.dtype, batch: int = 1) -> "TreePlan":
        if not spec.is_static:
            raise ValueError("a dynamic tree is planned per step (select_dynamic_tree), not once")
        parents_list, ranks_list = spec.parents(), spec.ranks()
        parents = torch.tensor([parents_list], dtype=torch.int64, device=device)
        ranks = torch.tensor([ranks_list], dtype=torch.int64, device=device)
        masks = ops.build_tree(parents, 0)  # the op's mask and depths: plan time only, never per step
        depth_list = masks.depth[0].tolist()
        drafted_end = len(parents_list) - spec.lookup  # the drafter's nodes; the lookup chain after them
        # Nodes the drafter runs: those with drafted children (a lookup node's child is the lookup's, never run).
        has_children = set(parents_list[1:drafted_end])
        levels, expanded, parent_in_level, children_needed = [], [], [None], [None]
        for d in range(spec.draft_depth + 1):
            members = [i for i, n in enumerate(depth_list[:drafted_end]) if n == d]
            if members != list(range(members[0], members[-1] + 1)):
                raise ValueError(f"tree nodes of depth {d} are not contiguous: {members}")  # TreeSpec sorts them
            levels.append((members[0], members[-1] + 1))
            expanded.append([i for i in members if i in has_children])
        for d in range(1, spec.draft_depth + 1):
            start, end = levels[d]
            above = expanded[d - 1]
            parent_in_level.append(torch.tensor([above.index(parents_list[i]) for i in range(start, end)],
                                                dtype=torch.int64, device=device))
            children_needed.append(max(ranks_list[start:end]) + 1)
        # Node i sits at offset i of the drafter's tree region when the drafter runs it; leaves never run.
        drafted = torch.tensor([[i if i == 0 or i in has_children else -1 for i in range(len(depth_list))]],
                               dtype=torch.int64, device=device)
        expanded = tuple(torch.tensor(nodes, dtype=torch.int64, device=device) for nodes in expanded)
        block = additive(masks.mask[:, 0], dtype)
        leaves = torch.tensor([i for i in range(1, len(depth_list)) if i not in has_children], dtype=torch.int64,
                              device=device)
        return cls(len(depth_list), spec.depth, parents.expand(batch, -1).contiguous(), masks.depth, ranks,
                   block, tuple(levels), expanded, tuple(parent_in_level), tuple(children_needed), drafted, leaves,
                   block[:, leaves], spec.draft_depth, (drafted_end, len(parents_list)))
