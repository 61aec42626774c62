"""TreeMasks: everything the verifier needs to run one forward over a token tree."""
from __future__ import annotations

from typing import NamedTuple

import torch


class TreeMasks(NamedTuple):
    """Output of `sdalign_rt.ops.build_tree` for parents[B, N].

    positions: [B, N] int64, prefix_len + depth of each node (rotary positions of the tree tokens).
    mask:      [B, 1, N, N] bool, mask[b, 0, i, j] is True iff j is i or an ancestor of i.
    bitmask:   [B, N, ceil(N / 32)] int32, bit (j % 32) of word j // 32 of row i set iff mask[b, 0, i, j].
    retrieve:  [B, L, max_depth + 1] int64, root-to-leaf node indices of every leaf (leaves in increasing
               node order), padded with -1; L is the largest leaf count and max_depth the largest depth
               over the batch.
    depth:     [B, N] int64, depth of each node (root = 0).
    """

    positions: torch.Tensor
    mask: torch.Tensor
    bitmask: torch.Tensor
    retrieve: torch.Tensor
    depth: torch.Tensor

    def additive_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The boolean mask as an additive attention bias [B, 1, N, N]: 0 where visible, dtype's min elsewhere."""
        bias = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
        return bias.masked_fill_(~self.mask, torch.finfo(dtype).min)

    @property
    def max_depth(self) -> int:
        return self.retrieve.shape[-1] - 1
