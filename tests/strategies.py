"""Hypothesis strategies and builders shared by the op tests: trees, token tables, hidden states."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

TREE_SHAPES = ("random", "chain", "star", "deep", "bushy")


def make_parents(shape: str, n: int, rng: np.random.Generator) -> list[int]:
    """One valid parents row of n nodes (parents precede children) in the named shape."""
    parents = [-1]
    for i in range(1, n):
        if shape == "chain":
            parents.append(i - 1)
        elif shape == "star":
            parents.append(0)
        elif shape == "deep":  # mostly extends the newest node: long paths with a few branches
            parents.append(i - 1 if rng.random() < 0.8 else int(rng.integers(0, i)))
        elif shape == "bushy":  # a few children per node, breadth first, like top-k expansions
            parents.append(int((i - 1) // 3))
        else:
            parents.append(int(rng.integers(0, i)))
    return parents


@st.composite
def trees(draw, min_nodes: int = 1, max_nodes: int = 64, max_batch: int = 4, same_shape: bool = False):
    """parents[B, N] int tensor; each batch row is its own tree (batches whose trees differ)."""
    batch = draw(st.integers(1, max_batch))
    n = draw(st.integers(min_nodes, max_nodes))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shapes = [draw(st.sampled_from(TREE_SHAPES))] * batch if same_shape else [
        draw(st.sampled_from(TREE_SHAPES)) for _ in range(batch)]
    dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    return torch.tensor([make_parents(s, n, rng) for s in shapes], dtype=dtype)


def planted_tokens(parents: torch.Tensor, vocab: int, match_rate: float, seed: int):
    """(draft_tokens, target_argmax) where a node's draft equals its parent's argmax with prob match_rate.

    Siblings compete for their parent's argmax, so trees get several accepted branches, ties between equal
    depths and duplicate sibling tokens."""
    gen = torch.Generator().manual_seed(seed)
    batch, n = parents.shape
    draft = torch.randint(0, vocab, (batch, n), generator=gen)
    argmax = torch.randint(0, vocab, (batch, n), generator=gen)
    hits = torch.rand(batch, n, generator=gen) < match_rate
    p = parents.long()
    for b in range(batch):
        for i in range(1, n):
            if hits[b, i]:
                draft[b, i] = argmax[b, p[b, i]]
    return draft, argmax


def paths_of(parents_row: list[int], node: int) -> list[int]:
    path = []
    while node != -1:
        path.append(node)
        node = parents_row[node]
    return path[::-1]


def hidden_states(shape, dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as t in a non-contiguous layout: 'transposed' last two dims, or every other column."""
    if how == "contiguous":
        return t
    if how == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


LAYOUTS = ("contiguous", "transposed", "every-other")
