"""StaticKVCache: one model's K/V in fixed-capacity buffers, and which slots each batch row holds.

Layout. Layers that live on one device share one buffer [L_dev, 2, B, H, capacity, Dh] (a model spread over
two GPUs by accelerate's device_map gets two buffers, each beside its layers). Nothing is ever reallocated:
capacity is sized before prefill (prompt + new tokens + the tree's depth, which a row's last step may accept
past them, + one tree region + one scratch slot), so every step reads and writes tensors of the same shapes
and can be captured as a CUDA graph.

Rows. Row b's slots [start_b, length_b) hold its committed tokens in order: slot s carries position
s - start_b. Slots before start_b are the left padding of its prompt; slots from length_b on are free (a
step writes its tree nodes there, node i at length_b + i, and `kv_compact` moves the accepted ones down).
`bias[B, capacity]` is the additive attention bias of that state, 0 on committed slots and the dtype's
minimum elsewhere, kept on the device and refreshed in place after each step. The last slot is scratch: a
write that must land nowhere (a recomputed token whose K/V are already cached) goes there; no row sees it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sdalign_rt import ops


def additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean visibility mask as an additive attention bias: 0 where visible, dtype's min elsewhere."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible,
                                                                                       torch.finfo(dtype).min)


class CapacityError(ValueError):
    """A run would write past the cache's fixed capacity."""


class StaticKVCache:
    def __init__(self, layer_devices: list, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype):
        if capacity < 2 or batch < 1 or not layer_devices:
            raise ValueError(f"a cache needs layers, batch >= 1 and capacity >= 2, got {len(layer_devices)} layers, "
                             f"batch {batch}, capacity {capacity}")
        self.batch, self.capacity, self.dtype = batch, capacity, dtype
        devices = [torch.device(d) for d in layer_devices]
        # Consecutive layers on one device share a buffer: [layers there, K/V, B, H, capacity, Dh].
        self.buffers: list[torch.Tensor] = []
        self._where: list[tuple[int, int]] = []  # layer -> (buffer, index in it)
        for layer, device in enumerate(devices):
            if layer == 0 or device != devices[layer - 1]:
                count = next((j for j in range(layer, len(devices)) if devices[j] != device), len(devices)) - layer
                self.buffers.append(torch.zeros(count, 2, batch, kv_heads, capacity, head_dim, dtype=dtype,
                                                device=device))
                first = layer
            self._where.append((len(self.buffers) - 1, layer - first))
        # Each layer's (keys, values): [B, H, capacity, Dh] views of its buffer, made once.
        self._views = [(self.buffers[b][i, 0], self.buffers[b][i, 1]) for b, i in self._where]
        self.device = devices[0]  # where the bookkeeping lives: the embeddings' side
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.starts = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.bias = torch.full((batch, capacity), torch.finfo(dtype).min, dtype=dtype, device=self.device)
        self._slot_index = torch.arange(capacity, device=self.device)

    @property
    def num_layers(self) -> int:
        return len(self._where)

    @property
    def scratch_slot(self) -> int:
        return self.capacity - 1

    def static_tensors(self) -> list[torch.Tensor]:
        """Every tensor a compiled forward writes in place: the buffers and the per-layer views made of them
        (a view is its own tensor to torch.compile, so marking the base alone leaves CUDA graphs off)."""
        return [*self.buffers, *(t for pair in self._views for t in pair)]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of one layer: [B, H, capacity, Dh] views of its buffer."""
        return self._views[index]

    def layer_device(self, index: int) -> torch.device:
        return self.buffers[self._where[index][0]].device

    @staticmethod
    def write(keys: torch.Tensor, values: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor,
              slot_index: torch.Tensor) -> None:
        """keys[b, :, slot[b, t]] = new_keys[b, :, t] (same for values); slot_index is the slots [B, T]
        expanded to [B, H, T, Dh] (built once per forward and device)."""
        if new_keys.dtype != keys.dtype:
            new_keys, new_values = new_keys.to(keys.dtype), new_values.to(values.dtype)
        keys.scatter_(2, slot_index, new_keys)
        values.scatter_(2, slot_index, new_values)

    def slot_range(self, width: int) -> torch.Tensor:
        """[1, width] int64: 0 .. width - 1 (offsets into a tree region), a view of a tensor made once."""
        return self._slot_index[None, :width]

    def next_positions(self) -> torch.Tensor:
        """[B] the position of each row's next token (its committed tokens, left padding not counted)."""
        return self.lengths - self.starts

    def refresh_bias(self) -> None:
        """bias := 0 on slots [start, length) of each row, dtype min elsewhere (in place, fixed shape)."""
        visible = (self._slot_index >= self.starts[:, None]) & (self._slot_index < self.lengths[:, None])
        self.bias.copy_(torch.where(visible, 0.0, torch.finfo(self.dtype).min))

    def reset(self, starts: torch.Tensor, lengths: torch.Tensor) -> None:
        self.starts.copy_(starts)
        self.lengths.copy_(lengths)
        self.refresh_bias()

    def compact(self, accept_nodes: torch.Tensor, tree_start: torch.Tensor) -> None:
        """Move each row's accepted tree slots (node i at tree_start + i) to tree_start + 0, 1, ... in every
        layer (sd.ops.kv_compact: one launch per buffer on CUDA). Lengths are the caller's to advance."""
        for buffer in self.buffers:
            if buffer.device == accept_nodes.device:
                ops.kv_compact(buffer, accept_nodes, tree_start)
            else:
                ops.kv_compact(buffer, accept_nodes.to(buffer.device), tree_start.to(buffer.device))

    def check_room(self, longest_row: int, what: str) -> None:
        """A clear error instead of a write past the end (checked on host ints, before the step)."""
        if longest_row > self.scratch_slot:
            raise CapacityError(f"{what} needs {longest_row} cache slots per row, but the cache holds "
                                f"{self.scratch_slot} (capacity {self.capacity} minus one scratch slot); size it "
                                "for prompt + max_new_tokens + the tree")

    def mask(self, block: torch.Tensor, offset: torch.Tensor) -> "CacheMask":
        """What T queries see: every row's committed slots, plus the block ([B or 1, T, W], additive) placed at
        slot offset[b] + j, overriding the committed rule there. With offset = lengths, the block is the tree
        region (node j at length + j). No [T, capacity] tensor is made until an attention needs one (dense())."""
        return CacheMask(self, block, offset)

    def attention_bias(self, block: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The dense form of mask(block, offset): an additive bias [B, 1, T, capacity]."""
        return self.mask(block, offset).dense()


@dataclass
class CacheMask:
    """A forward's attention mask over a StaticKVCache in its structured form (see StaticKVCache.mask): the lean
    forward hands it to sd.ops.tree_attention on CUDA, which reads only the slots a row uses; SDPA on the CPU and
    transformers' forwards take its dense() bias."""
    cache: StaticKVCache
    block: torch.Tensor  # [B or 1, T, W] additive: 0 where visible, the dtype's min elsewhere
    offset: torch.Tensor  # [B] int64: the block's first slot per row

    def dense(self) -> torch.Tensor:
        """[B, 1, T, capacity] additive bias: the committed bias with the block scattered over it."""
        cache = self.cache
        _, queries, width = self.block.shape
        bias = cache.bias[:, None, :].expand(cache.batch, queries, cache.capacity).clone()
        columns = (self.offset[:, None, None] + cache.slot_range(width)[:, None]).expand(cache.batch, queries, width)
        bias.scatter_(2, columns, self.block.expand(cache.batch, queries, width).to(bias.dtype))
        return bias[:, None]

    def parts(self, device) -> tuple:
        """(starts, lengths, block bool, offset) on `device`, as sd.ops.tree_attention takes them."""
        cache = self.cache
        return (cache.starts.to(device), cache.lengths.to(device), (self.block == 0).to(device),
                self.offset.to(device))
