"""Plain PyTorch definitions of every op: the spec that the Triton kernels and C++ ops are tested against.

These functions assume validated input (sdalign_rt.ops checks it) and favour clarity over speed:
the tree ops walk the tree in Python. Rounding points are part of the spec where a kernel has them
(fused_adapter casts its matmul operands to the weights' dtype), so reference and kernel differ only by
accumulation order.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from sdalign_rt.tree_masks import TreeMasks

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, written out so the kernels can mirror it operation for operation."""
    return 0.5 * x * (1.0 + torch.erf(x * _INV_SQRT2))


def fused_adapter(x, w_down, b_down, w_up, b_up):
    """y = x + gelu(x @ w_down.T + b_down) @ w_up.T + b_up, output in x's dtype.

    Both matmuls take operands in the weights' dtype (x and the GELU output are rounded to it) and
    accumulate in fp32; the residual and biases are added in fp32. With fp32 weights this is plain fp32.
    Biases may be None (treated as zero).
    """
    compute = w_down.dtype
    xf = x.float()
    h = x.to(compute).float() @ w_down.float().t()
    if b_down is not None:
        h = h + b_down.float()
    h = gelu_erf(h)
    y = xf + h.to(w_up.dtype).float() @ w_up.float().t()
    if b_up is not None:
        y = y + b_up.float()
    return y.to(x.dtype)


def cosine_similarity_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row cosine in fp32: dot / |a| / |b|, 0 where either row has zero norm, clamped to [-1, 1].

    Non-finite rows give nan (never accepted), not 0: zero norm is tested with ==, which nan fails.
    """
    af, bf = a.float(), b.float()
    dot = (af * bf).sum(-1)
    norm_a = (af * af).sum(-1).sqrt()
    norm_b = (bf * bf).sum(-1).sqrt()
    nonzero = (norm_a != 0) & (norm_b != 0)
    sims = torch.where(nonzero, dot / torch.where(nonzero, norm_a, 1.0) / torch.where(nonzero, norm_b, 1.0), 0.0)
    return sims.clamp(-1.0, 1.0)


def count_accepted(accept: torch.Tensor, mode: str) -> torch.Tensor:
    """n_accept[B] int64: leading run of True ("consecutive") or count of True ("relaxed")."""
    if mode == "consecutive":
        return accept.long().cumprod(-1).sum(-1)
    return accept.long().sum(-1)


def cosine_accept(a, b, threshold: float, mode: str = "consecutive"):
    """(sims[B, T] fp32, accept[B, T] bool, n_accept[B] int64) with accept = sims >= threshold."""
    sims = cosine_similarity_rows(a, b)
    accept = sims >= threshold
    return sims, accept, count_accepted(accept, mode)


def adapter_cosine_accept(a, b, w_down, b_down, w_up, b_up, threshold: float, mode: str = "consecutive"):
    """fused_adapter(a) then cosine_accept against b: (adapted[B, T, D], sims, accept, n_accept).

    The cosine is taken on the adapted hidden as returned (rounded to a's dtype).
    """
    adapted = fused_adapter(a, w_down, b_down, w_up, b_up)
    return (adapted, *cosine_accept(adapted, b, threshold, mode))


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """[..., N] bool -> [..., ceil(N / 32)] int32 words, bit j % 32 of word j // 32."""
    n = mask.shape[-1]
    words = (n + 31) // 32
    padded = torch.zeros(*mask.shape[:-1], words * 32, dtype=torch.int64, device=mask.device)
    padded[..., :n] = mask.long()
    shifts = torch.arange(32, device=mask.device, dtype=torch.int64)
    packed = (padded.view(*mask.shape[:-1], words, 32) << shifts).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # two's complement


def tree_depths(parents: torch.Tensor) -> torch.Tensor:
    """depth[B, N] int64 of every node of valid trees (root depth 0)."""
    rows = parents.tolist()
    depth = [[0] * len(row) for row in rows]
    for b, row in enumerate(rows):
        for i in range(1, len(row)):
            depth[b][i] = depth[b][row[i]] + 1
    return torch.tensor(depth, dtype=torch.int64, device=parents.device).view(parents.shape)


def build_tree(parents: torch.Tensor, prefix_len: torch.Tensor) -> TreeMasks:
    """Tree attention data for parents[B, N] (parents[b, 0] == -1, parents[b, i] < i) on top of prefix_len[B]."""
    batch, n = parents.shape
    device = parents.device
    rows = parents.tolist()
    depth = tree_depths(parents)
    mask = torch.zeros(batch, n, n, dtype=torch.bool)
    for b, row in enumerate(rows):
        mask[b, 0, 0] = True
        for i in range(1, n):
            mask[b, i] = mask[b, row[i]]
            mask[b, i, i] = True
    leaves = [[i for i in range(n) if i not in set(row[1:])] for row in rows]
    max_depth = int(depth.max())
    retrieve = torch.full((batch, max(len(l) for l in leaves), max_depth + 1), -1, dtype=torch.int64)
    for b, row in enumerate(rows):
        for r, leaf in enumerate(leaves[b]):
            node = leaf
            while node != -1:
                retrieve[b, r, depth[b, node]] = node
                node = row[node]
    positions = prefix_len.to(device=device, dtype=torch.int64).view(batch, 1) + depth
    mask = mask.to(device)
    return TreeMasks(
        positions=positions,
        mask=mask.unsqueeze(1),
        bitmask=_pack_bits(mask),
        retrieve=retrieve.to(device),
        depth=depth,
    )


def _path_to(node: int, parents_row: list[int], width: int) -> list[int]:
    path = []
    while node != -1:
        path.append(node)
        node = parents_row[node]
    path.reverse()
    return path + [-1] * (width - len(path))


def verify_tree_greedy(draft_tokens, parents, target_argmax):
    """Greedy tree verification: (accept_nodes[B, max_depth + 1] padded -1, accept_len[B], bonus_token[B]).

    Node i > 0 is accepted iff its parent is accepted and draft_tokens[i] == target_argmax[parent(i)]; the
    root is always accepted. The deepest accepted node wins (ties: lowest node index); accept_len counts the
    accepted nodes including the root, and bonus_token is target_argmax at the last accepted node.
    max_depth is the largest tree depth over the batch.
    """
    batch, n = parents.shape
    rows, tokens, argmax = parents.tolist(), draft_tokens.tolist(), target_argmax.tolist()
    depth = tree_depths(parents).tolist()
    width = max(max(d) for d in depth) + 1
    accept_nodes, accept_len, bonus = [], [], []
    for b in range(batch):
        accepted = [True] + [False] * (n - 1)
        for i in range(1, n):
            p = rows[b][i]
            accepted[i] = accepted[p] and tokens[b][i] == argmax[b][p]
        best = max((i for i in range(n) if accepted[i]), key=lambda i: (depth[b][i], -i))
        accept_nodes.append(_path_to(best, rows[b], width))
        accept_len.append(depth[b][best] + 1)
        bonus.append(argmax[b][best])
    device = parents.device
    return (
        torch.tensor(accept_nodes, dtype=torch.int64, device=device),
        torch.tensor(accept_len, dtype=torch.int64, device=device),
        torch.tensor(bonus, dtype=torch.int64, device=device),
    )


def _sample_from(weights: torch.Tensor, mass: float, u: float) -> int:
    """Inverse CDF: the first index whose running sum exceeds u * mass (the last positive one if rounding
    leaves none; token 0 if no weight is positive: a nan or all-zero row, never a negative id)."""
    cdf = torch.cumsum(weights, 0)
    hits = torch.nonzero(cdf > u * mass)
    if hits.numel():
        return int(hits[0])
    positive = torch.nonzero(weights > 0)
    return int(positive[-1]) if positive.numel() else 0


def verify_tree_sampling(draft_tokens, parents, target_probs, uniform):
    """Lossless multi-branch speculative sampling over a tree of deterministic (top-k) drafts.

    target_probs[B, N, V]: the verifier's next-token distribution after each node (already tempered /
    truncated; need not be normalised). uniform[B, N] in [0, 1): uniform[b, i] (i > 0) decides node i's test,
    uniform[b, 0] draws the bonus token. From the root, the children of the current node u are tried in
    increasing index order: with w = target_probs[u] with already rejected tokens zeroed and m = sum(w),
    child token x is accepted iff uniform[child] * m < w[x] (probability w[x] / m); on rejection w[x] = 0.
    When a child is accepted it becomes u; when none is, the bonus token is drawn from w by inverse CDF.
    Returns (accept_nodes[B, max_depth + 1] padded -1, accept_len[B], bonus_token[B]).
    """
    batch, n = parents.shape
    rows, tokens = parents.tolist(), draft_tokens.tolist()
    depth = tree_depths(parents).tolist()
    width = max(max(d) for d in depth) + 1
    probs = target_probs.float().cpu()
    coins = uniform.float().cpu()
    accept_nodes, accept_len, bonus = [], [], []
    for b in range(batch):
        node = 0
        weights = probs[b, 0].clone()
        mass = float(weights.sum())
        for child in range(1, n):
            if rows[b][child] != node:
                continue
            x = tokens[b][child]
            w = float(weights[x])
            if float(coins[b, child]) * mass < w:
                node = child
                weights = probs[b, child].clone()
                mass = float(weights.sum())
            else:
                weights[x] = 0.0
                mass -= w
        accept_nodes.append(_path_to(node, rows[b], width))
        accept_len.append(depth[b][node] + 1)
        bonus.append(_sample_from(weights, mass, float(coins[b, 0])))
    device = parents.device
    return (
        torch.tensor(accept_nodes, dtype=torch.int64, device=device),
        torch.tensor(accept_len, dtype=torch.int64, device=device),
        torch.tensor(bonus, dtype=torch.int64, device=device),
    )


def kv_compact_indices(accept_nodes: torch.Tensor, prefix_len: torch.Tensor):
    """Cache slots to move: (src[B, M], dst[B, M], new_len[B]) int64, -1 where accept_nodes is padding.

    Tree node i was written at slot prefix_len + i; the k-th accepted node moves to slot prefix_len + k.
    """
    valid = accept_nodes >= 0
    prefix = prefix_len.to(accept_nodes.device, torch.int64).view(-1, 1)
    steps = torch.arange(accept_nodes.shape[1], device=accept_nodes.device).view(1, -1)
    src = torch.where(valid, prefix + accept_nodes, -1)
    dst = torch.where(valid, prefix + steps, -1)
    return src, dst, prefix.view(-1) + valid.sum(-1)


def kv_compact(caches: Sequence[torch.Tensor], accept_nodes: torch.Tensor, prefix_len: torch.Tensor):
    """Move accepted tree slots to [prefix_len, prefix_len + accept_len) in every cache tensor, in place.

    Each cache tensor is [..., B, H, S, Dh] (any leading dims: layers, K/V). Returns new_len[B] int64.
    """
    src, dst, new_len = kv_compact_indices(accept_nodes, prefix_len)
    for cache in caches:
        for b in range(accept_nodes.shape[0]):
            valid = src[b] >= 0
            s, d = src[b][valid], dst[b][valid]
            rows = cache[..., b, :, :, :].index_select(-2, s)  # gather before scatter: ranges may overlap
            cache[..., b, :, :, :].index_copy_(-2, d, rows)
    return new_len


def cache_visibility(starts: torch.Tensor, lengths: torch.Tensor, block: torch.Tensor, offset: torch.Tensor,
                     capacity: int) -> torch.Tensor:
    """[B, T, S] bool: which cache slots each query sees. Row b's committed slots [starts_b, lengths_b), and over
    the W slots from offset_b the block [B or 1, T, W] (bool), which overrides the committed rule there."""
    batch, tokens, width = starts.shape[0], block.shape[1], block.shape[2]
    slots = torch.arange(capacity, device=starts.device)
    committed = (slots >= starts[:, None]) & (slots < lengths[:, None])  # [B, S]
    column = slots[None, :] - offset[:, None]  # [B, S]: index into the block, where in [0, W)
    in_block = (column >= 0) & (column < width)
    from_block = block.expand(batch, tokens, width).gather(2, column.clamp(0, width - 1)[:, None, :].expand(
        batch, tokens, capacity))
    return torch.where(in_block[:, None, :], from_block, committed[:, None, :])


def tree_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                   lengths: torch.Tensor, block: torch.Tensor, offset: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over the cache (q [B, H, T, Dh]; keys / values [B, H_kv, S, Dh], query head h
    reading KV head h // (H / H_kv)), the mask from cache_visibility; fp32 math, output in q's dtype."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    visible = cache_visibility(starts, lengths, block, offset, keys.shape[2])
    k = keys.float().repeat_interleave(heads // kv_heads, dim=1)
    v = values.float().repeat_interleave(heads // kv_heads, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)


def lookup_proposals(text: list, proposals: int, max_ngram: int = 3, min_ngram: int = 1) -> tuple[list, int]:
    """Prompt lookup on one text (plain Python; sdalign_rt/lookup.py is the batched device version): for n from
    max_ngram down to min_ngram, the latest earlier occurrence of the text's last n tokens that has a token after
    it; returns (the `proposals` tokens that followed it, n), padded with the text's last token where the text ends
    first; (the last token repeated, 0) when nothing matches."""
    for n in range(max_ngram, min_ngram - 1, -1):
        if len(text) <= n:
            continue
        suffix = text[-n:]
        for start in range(len(text) - n - 1, -1, -1):
            if text[start:start + n] == suffix:
                after = text[start + n: start + n + proposals]
                return after + [text[-1]] * (proposals - len(after)), n
    return [text[-1]] * proposals, 0
