"""ContextLookup: draft tokens copied from the text itself (prompt lookup decoding), on the device, per row.

Answers repeat their inputs: a rewrite, a summary, code edited or explained, a translation that keeps names and
numbers. Each step, the text's last n tokens (n = max_ngram down to min_ngram, the longest that occurs before)
are looked up in the row's whole text (prompt and everything emitted, root included) and the `proposals` tokens
that followed their latest earlier occurrence become a chain of draft nodes (TreeSpec.with_lookup). The
verifier checks them with the rest of the tree, so they change what a step accepts, never what is decoded:
greedy acceptance keeps only the verifier's own tokens, and sample mode treats them as the deterministic drafts
they are. They cost no drafter forward, only verifier width.

Buffers (static, written in place; B rows, C the capacity of the verifier's cache):

    text     [B, C] int64   each row's tokens, left-aligned: prompt (padding dropped), emitted tokens, the root
    length   [B] int64      how many of them are set

No step reads anything back to the host, so a captured decode step replays the lookup too.

Example
-------
>>> lookup = ContextLookup(batch=1, capacity=16, proposals=2, device="cpu")
>>> ids = torch.tensor([[7, 1, 2, 3, 9, 1, 2]])
>>> lookup.start(ids, torch.ones_like(ids), torch.tensor([3]))   # text: 7 1 2 3 9 1 2 3
>>> tokens, matched = lookup.propose()                           # "1 2 3" was followed by "9 1"
>>> tokens.tolist(), matched.tolist()
([[9, 1]], [3])
"""
from __future__ import annotations

import torch


class ContextLookup:
    def __init__(self, batch: int, capacity: int, proposals: int, device, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        if proposals < 1:
            raise ValueError(f"proposals must be >= 1, got {proposals}")
        if capacity <= max_ngram:
            raise ValueError(f"capacity {capacity} must exceed max_ngram {max_ngram}")
        self.proposals, self.max_ngram, self.min_ngram = proposals, max_ngram, min_ngram
        self.text = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.length = torch.zeros(batch, dtype=torch.long, device=device)
        self._columns = torch.arange(capacity, device=device)
        self._ahead = torch.arange(proposals, device=device)

    @property
    def buffers(self) -> list[torch.Tensor]:
        """What a step changes (a step object's snapshot saves and restores them)."""
        return [self.text, self.length]

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, roots: torch.Tensor) -> None:
        """A new text per row: the left-padded prompt's tokens [B, P] (mask 0/1), then the first token roots [B]."""
        batch, width = input_ids.shape
        capacity = self.text.shape[1]
        if width + 1 > capacity:
            raise ValueError(f"a prompt of {width} tokens does not fit the lookup's capacity {capacity}")
        mask = attention_mask.to(self.text.device).bool()
        count = mask.sum(-1)
        pad = width - count
        source = (self._columns[None, :width] + pad[:, None]).clamp(max=width - 1)
        self.text.zero_()
        self.text[:, :width] = input_ids.to(self.text.device).gather(1, source)
        self.text.scatter_(1, count[:, None], roots.to(self.text.device)[:, None])
        self.length.copy_(count + 1)

    def append(self, tokens: torch.Tensor, counts: torch.Tensor) -> None:
        """tokens [B, W]: each row's first counts[b] are appended (the rest land past the new length, unread)."""
        capacity = self.text.shape[1]
        columns = (self.length[:, None] + self._columns[None, :tokens.shape[1]]).clamp(max=capacity - 1)
        self.text.scatter_(1, columns, tokens.to(self.text.dtype))
        # A text that outgrows the buffer keeps its first capacity tokens (the decode step's cache, sized alike,
        # refuses first under generate; stepping a session by hand past it must not read out of bounds).
        self.length.add_(counts.to(self.length.dtype)).clamp_(max=capacity)

    def propose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, proposals], matched [B]): what followed the latest earlier occurrence of the text's longest
        matching suffix (max_ngram down to min_ngram), and that suffix's length (0: none matched). Where nothing
        matches, or the text ends first, the proposal repeats the last token (a guess like any other: the
        verifier decides)."""
        text, length = self.text, self.length
        capacity = text.shape[1]
        last = text.gather(1, (length - 1).clamp(min=0)[:, None])
        start = torch.full_like(length, -1)  # where the chosen continuation begins (-1: none yet)
        matched = torch.zeros_like(length)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            suffix = text.gather(1, (length[:, None] - n + self._columns[None, :n]).clamp(min=0))  # [B, n]
            windows = text.unfold(1, n, 1)  # [B, C - n + 1, n]: window s holds text[s : s + n]
            begins = self._columns[: capacity - n + 1]
            # An earlier occurrence with at least one token after it (s + n < length excludes the suffix itself).
            hits = (windows == suffix[:, None, :]).all(-1) & (begins[None] + n < length[:, None])
            latest = torch.where(hits, begins[None], -1).amax(-1)
            first = (start < 0) & (latest >= 0)
            matched = torch.where(first, n, matched)
            start = torch.where(first, latest + n, start)
        columns = start[:, None] + self._ahead[None]
        inside = (start[:, None] >= 0) & (columns < length[:, None])
        copied = text.gather(1, columns.clamp(min=0, max=capacity - 1))
        return torch.where(inside, copied, last), matched
