"""Draft-tree specifications: the shape of the tree a drafting step proposes.

A tree is described by parents[N] (node 0 is the root: the last committed token; parents precede children)
and, per node, the rank of its token among its parent's top-k draft tokens. Static shapes (chains, Medusa /
EAGLE-1 choice lists) are planned once and reused every step; dynamic trees (EAGLE-2) are expanded top_k
per node for `depth` levels and the best `total_tokens` nodes by cumulative draft log-probability are kept
(`select_dynamic_tree`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from sdalign_rt import checks

TREE_KINDS = ("chain", "static", "dynamic")
# The rank a context-lookup node carries (Draft.ranks, acceptance by rank): it is not among the drafter's candidates.
LOOKUP_RANK = -2


@dataclass(frozen=True)
class TreeSpec:
    """The shape of the tree each step drafts: a chain, static rank paths, or a dynamic (EAGLE-2) expansion.

    Example
    -------
    >>> tree = TreeSpec.static([(0,), (1,), (0, 0)])  # the top two tokens, then the top token after the first
    >>> tree.parents(), tree.ranks(), tree.depth, tree.num_nodes
    ([-1, 0, 0, 1], [-1, 0, 1, 0], 2, 4)
    >>> TreeSpec.parse("chain:3").parents()
    [-1, 0, 1, 2]
    """

    kind: str
    depth: int
    top_k: int
    total_tokens: int  # draft nodes, the root excluded
    choices: tuple[tuple[int, ...], ...] = ()  # static: each node's path of sibling ranks, in node order
    # Context lookup (prompt lookup decoding): a chain of this many nodes under the root, after the drafter's nodes,
    # proposing what followed the latest earlier occurrence of the text's last tokens (sdalign_rt/lookup.py). Those
    # nodes cost verifier width only: the drafter never runs them. depth and total_tokens count them.
    lookup: int = 0
    # Context lookup in place: at depths 1..lookup_top the top-ranked path ((0,), (0, 0), ...) takes the lookup's
    # proposals instead of the drafter's tokens, in rows whose last 2+ tokens occurred before (else the drafter's
    # stay). No extra width: what a CPU, where each verified node costs, can afford (bench/results/lookup_cpu.json).
    lookup_top: int = 0

    @classmethod
    def chain(cls, depth: int) -> "TreeSpec":
        """depth drafts in a line: one verifier forward checks depth + 1 tokens (drafts and the root)."""
        _positive("depth", depth)
        return cls("chain", depth, 1, depth, tuple((0,) * d for d in range(1, depth + 1)))

    @classmethod
    def static(cls, choices: Iterable[Sequence[int]]) -> "TreeSpec":
        """A fixed tree from rank paths, as in Medusa / EAGLE-1: (0,) is the drafter's top token after the
        root, (1,) its second, (0, 2) the third-ranked token after (0,). Every prefix of a path must be listed."""
        paths = [tuple(int(r) for r in c) for c in choices]
        if not paths:
            raise ValueError("static tree choices must not be empty")
        seen = set()
        for path in paths:
            if not path:
                raise ValueError("static tree choices must not contain the empty path (the root is implicit)")
            if any(r < 0 for r in path):
                raise ValueError(f"static tree choice {path} has a negative rank")
            if path in seen:
                raise ValueError(f"static tree choice {path} is listed twice")
            seen.add(path)
        for path in paths:
            if len(path) > 1 and path[:-1] not in seen:
                raise ValueError(f"static tree choice {path} needs its parent {path[:-1]} in the choices")
        ordered = tuple(sorted(paths, key=lambda p: (len(p), p)))  # parents before children, ranks in order
        return cls("static", max(map(len, ordered)), max(p[-1] for p in ordered) + 1, len(ordered), ordered)

    @classmethod
    def root_only(cls) -> "TreeSpec":
        """No drafts: each step verifies the root alone (plain one-token decoding through the same loop)."""
        return cls("root", 0, 0, 0, ())

    def with_lookup(self, nodes: int) -> "TreeSpec":
        """This tree plus a context-lookup chain of `nodes` proposals under the root (0: none). Static trees (and
        the root alone: lookup decoding without a drafter model) only: a dynamic tree's shape is chosen per step.

        >>> TreeSpec.chain(1).with_lookup(3).parents(), TreeSpec.chain(1).with_lookup(3).depth
        ([-1, 0, 0, 2, 3], 3)
        """
        if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 0:
            raise ValueError(f"lookup must be an int >= 0 (proposals per step), got {nodes!r}")
        if not self.is_static:
            raise ValueError("context lookup extends static trees (chain, static, the root alone); a dynamic tree's "
                             "shape is chosen per step")
        draft_depth, drafts = self.draft_depth, self.total_tokens - self.lookup
        return TreeSpec(self.kind, max(draft_depth, nodes), self.top_k, drafts + nodes, self.choices, nodes,
                        self.lookup_top)

    def with_lookup_top(self, depth: int) -> "TreeSpec":
        """This tree with its top-ranked path's first `depth` nodes taken from the context lookup where the text's
        last 2+ tokens occurred before (see the field). Static drafted trees only; depth <= draft_depth.

        >>> str(TreeSpec.chain(2).with_lookup_top(2))
        'chain:2+lookup-top:2'
        """
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise ValueError(f"lookup_top must be an int >= 0, got {depth!r}")
        if not self.is_static or self.draft_depth < depth:
            raise ValueError(f"lookup_top={depth} replaces drafted nodes of a static tree's top path, which this "
                             f"tree ({self}) has {self.draft_depth if self.is_static else 'no fixed'} of")
        missing = [(0,) * d for d in range(1, depth + 1) if (0,) * d not in self.choices]
        if missing:
            raise ValueError(f"lookup_top={depth} needs the top path {missing[0]} in the tree's choices")
        return TreeSpec(self.kind, self.depth, self.top_k, self.total_tokens, self.choices, self.lookup, depth)

    def with_lookup_top_within(self, depth: int) -> "TreeSpec":
        """with_lookup_top as deep as this tree's top path ((0,), (0, 0), ...) reaches, at most `depth` (a tree
        without a top path, or a dynamic one, is returned as it is)."""
        if not self.is_static:
            return self
        reach = 0
        while reach < depth and (0,) * (reach + 1) in self.choices:
            reach += 1
        return self.with_lookup_top(reach) if reach else self

    @property
    def draft_depth(self) -> int:
        """The depth of the drafter's own nodes (the lookup chain aside)."""
        return max((len(path) for path in self.choices), default=0) if self.is_static else self.depth

    @classmethod
    def dynamic(cls, top_k: int, depth: int, total_tokens: int) -> "TreeSpec":
        """EAGLE-2: expand the top_k best nodes by top_k children per level for depth levels, keep the
        total_tokens best nodes by cumulative draft log-probability."""
        _positive("top_k", top_k)
        _positive("depth", depth)
        _positive("total_tokens", total_tokens)
        # The root gives top_k candidates; each later level expands the top_k best nodes by top_k children.
        most = top_k + (depth - 1) * top_k * top_k
        if total_tokens > most:
            raise ValueError(f"total_tokens={total_tokens} exceeds the {most} candidates that top_k={top_k}, "
                             f"depth={depth} expand")
        return cls("dynamic", depth, top_k, total_tokens)

    @classmethod
    def parse(cls, text: str) -> "TreeSpec":
        """From the command line: "chain:4", "dynamic:TOP_K,DEPTH,TOTAL", or "static:" + a JSON list of rank
        paths ("static:[[0],[1],[0,0]]") or a JSON file holding one, or a plan written by `sdalign-rt
        plan-tree` ("static:plan.json", its "choices"); "+lookup:M" after a static tree adds a context-lookup
        chain of M proposals ("chain:1+lookup:4"), and "lookup:M" is that chain alone (no drafter model); then
        "+lookup-top:M" lets the lookup take the top path's first M nodes ("static:[[0]]+lookup-top:1")."""
        kind, _, arg = text.partition(":")
        try:
            base, plus, extra = text.partition("+lookup-top:")
            if plus:
                return cls.parse(base).with_lookup_top(int(extra))
            base, plus, extra = text.partition("+lookup:")
            if plus:
                return (cls.root_only() if base == "root" else cls.parse(base)).with_lookup(int(extra))
            if kind == "lookup":
                return cls.root_only().with_lookup(int(arg))
            if kind == "root" and not arg:
                return cls.root_only()
            if kind == "chain":
                return cls.chain(int(arg))
            if kind == "dynamic":
                top_k, depth, total = (int(v) for v in arg.split(","))
                return cls.dynamic(top_k, depth, total)
            if kind == "static":
                import json
                import os

                if os.path.isfile(arg):
                    with open(arg) as f:
                        loaded = json.load(f)
                    if isinstance(loaded, dict):  # a plan-tree report
                        loaded = loaded.get("plan", loaded).get("choices")
                    return cls.static(loaded)
                return cls.static(json.loads(arg))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"cannot read tree {text!r}: {exc}") from None
        raise ValueError(f"tree must be chain:DEPTH, static:CHOICES or dynamic:TOP_K,DEPTH,TOTAL; got {text!r}")

    def __str__(self) -> str:
        """The command-line form TreeSpec.parse reads back ("chain:4", "static:[[0],[1],[0,0]]", ...)."""
        if self.kind == "dynamic":
            return f"dynamic:{self.top_k},{self.depth},{self.total_tokens}"
        if self.kind == "root":
            return f"lookup:{self.lookup}" if self.lookup else "root"
        if self.kind == "chain":
            base = f"chain:{self.draft_depth}"
        else:
            base = "static:[" + ",".join("[" + ",".join(map(str, path)) + "]" for path in self.choices) + "]"
        return (base + (f"+lookup:{self.lookup}" if self.lookup else "")
                + (f"+lookup-top:{self.lookup_top}" if self.lookup_top else ""))

    @property
    def num_nodes(self) -> int:
        """Tree nodes the verifier checks per step: the root and the drafts."""
        return self.total_tokens + 1

    @property
    def is_static(self) -> bool:
        return self.kind != "dynamic"

    def parents(self) -> list[int]:
        """parents[N] of a static tree (root first, -1)."""
        self._require_static("parents")
        index = {(): 0}
        for i, path in enumerate(self.choices, start=1):
            index[path] = i
        first = len(self.choices) + 1  # the lookup chain: under the root, then each under the one before
        return [-1] + [index[path[:-1]] for path in self.choices] + [0 if i == 0 else first + i - 1
                                                                    for i in range(self.lookup)]

    def ranks(self) -> list[int]:
        """Each node's rank among its parent's draft tokens (the root: -1; lookup nodes: LOOKUP_RANK)."""
        self._require_static("ranks")
        return [-1] + [path[-1] for path in self.choices] + [LOOKUP_RANK] * self.lookup

    def parents_tensor(self, batch: int, device=None) -> torch.Tensor:
        """parents[B, N] int64 for a static tree, ready for sd.ops.build_tree."""
        return torch.tensor(self.parents(), dtype=torch.int64, device=device).expand(batch, -1).contiguous()

    def _require_static(self, what: str):
        if not self.is_static:
            raise ValueError(f"a dynamic tree has no fixed {what}: its shape is chosen each step by "
                             "select_dynamic_tree")


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def select_dynamic_tree(candidate_parents: torch.Tensor, candidate_tokens: torch.Tensor,
                        candidate_scores: torch.Tensor, total_tokens: int):
    """Keep the best total_tokens expanded nodes per row (EAGLE-2 reranking) as a tree rooted at node 0.

    candidate_parents[B, C]: each candidate's parent candidate index (-1: a child of the root), parents
    listed before children (the order expansion produces them). candidate_tokens[B, C]: drafted tokens.
    candidate_scores[B, C]: cumulative draft log-probabilities, non-increasing from parent to child, so the
    kept set always contains the parents of what it keeps (ties go to the earlier candidate).
    Returns (parents[B, total_tokens + 1], tokens[B, total_tokens + 1] with -1 at the root,
    kept[B, total_tokens]: the candidate index of each kept node, in tree order).
    """
    checks.tensor("candidate_parents", candidate_parents, ndim=2, dtypes=checks.INDEX_DTYPES)
    batch, count = candidate_parents.shape
    checks.token_ids("candidate_tokens", candidate_tokens, batch, count)
    checks.tensor("candidate_scores", candidate_scores, ndim=2, dtypes=checks.FLOAT_DTYPES)
    checks.shape("candidate_scores", candidate_scores, (batch, count), "one score per candidate")
    if not isinstance(total_tokens, int) or not 1 <= total_tokens <= count:
        raise ValueError(f"total_tokens must be an int in [1, {count}] (the candidates), got {total_tokens!r}")
    parents = candidate_parents.long()
    if checks.value_checks_enabled():
        index = torch.arange(count, device=parents.device).view(1, -1)
        if bool(((parents < -1) | (parents >= index)).any()):
            raise ValueError("candidate_parents must list parents before children (-1 for the root's children)")
        parent_scores = candidate_scores.gather(1, parents.clamp(min=0))
        if bool(((parents >= 0) & (candidate_scores > parent_scores)).any()):
            raise ValueError("candidate_scores must not increase from parent to child (cumulative log-probs)")
    # Best first, ties to the earlier candidate (stable sort), then back to candidate order so that
    # parents precede children in the kept tree.
    best = torch.sort(-candidate_scores.float(), dim=1, stable=True).indices[:, :total_tokens]
    kept = torch.sort(best, dim=1).values
    new_index = torch.full((batch, count), -1, dtype=torch.int64, device=parents.device)
    new_index.scatter_(1, kept, torch.arange(1, total_tokens + 1, device=parents.device).expand(batch, -1))
    kept_parents = parents.gather(1, kept)
    tree_parents = torch.where(kept_parents < 0, 0, new_index.gather(1, kept_parents.clamp(min=0)))
    root = torch.full((batch, 1), -1, dtype=torch.int64, device=parents.device)
    tokens = torch.cat([root, candidate_tokens.long().gather(1, kept)], dim=1)
    return torch.cat([root, tree_parents], dim=1), tokens, kept


def ancestor_closure(parents: torch.Tensor):
    """(mask[B, N, N] bool: self and ancestors, depth[B, N]) of valid trees, on device with no host sync:
    the closure of (I + parent adjacency) by log2(N) boolean squarings, as the build_tree kernel does."""
    batch, n = parents.shape
    index = torch.arange(n, device=parents.device)
    step = (parents.long()[..., None] == index) | torch.eye(n, dtype=torch.bool, device=parents.device)
    closure = step.float()
    for _ in range(max(1, (n - 1).bit_length())):
        closure = (closure @ closure).clamp_(max=1.0)
    mask = closure > 0
    return mask, mask.sum(-1) - 1
