"""PreallocatedCache: a transformers cache whose layers live in one preallocated buffer.

The buffer is [L, 2, B, H, capacity, Dh], allocated at the first write from the first layer's shapes.
Each layer's keys / values are views of the filled prefix, so appending writes in place (no per-step
concatenation), cropping only moves the length, and the per-layer K and V are equally spaced views of one
buffer, which sd.ops.kv_compact moves in a single launch on CUDA. If a run outgrows the capacity, the
buffer doubles (one copy), so a capacity estimate that is too small costs time, not correctness.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    def __init__(self, owner: "PreallocatedCache", index: int):
        super().__init__()
        self.owner, self.index, self.length = owner, index, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.owner.allocate(key_states)
        self.device = key_states.device
        self.is_initialized = True
        self._refresh()

    def _refresh(self) -> None:
        buffer = self.owner.buffer
        self.keys = buffer[self.index, 0, :, :, : self.length]
        self.values = buffer[self.index, 1, :, :, : self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        self.owner.reserve(self.length + new)
        buffer = self.owner.buffer
        buffer[self.index, 0, :, :, self.length: self.length + new] = key_states
        buffer[self.index, 1, :, :, self.length: self.length + new] = value_states
        self.length += new
        self._refresh()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        # transformers 4.x passed an absolute length (negative: tokens to remove); 5.x passes -tokens_to_remove.
        target = self.length - abs(tokens_to_remove) if tokens_to_remove <= 0 else tokens_to_remove
        self.length = max(0, min(self.length, target))
        if self.is_initialized:
            self._refresh()

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._refresh()


class PreallocatedCache(Cache):
    def __init__(self, num_layers: int, capacity: int):
        if num_layers < 1 or capacity < 1:
            raise ValueError(f"num_layers and capacity must be positive, got {num_layers} and {capacity}")
        self.num_layers, self.capacity = num_layers, capacity
        self.buffer: torch.Tensor | None = None
        super().__init__(layers=[PreallocatedLayer(self, i) for i in range(num_layers)])

    def allocate(self, key_states: torch.Tensor) -> None:
        if self.buffer is None:
            batch, heads, _, head_dim = key_states.shape
            self.buffer = torch.empty(self.num_layers, 2, batch, heads, self.capacity, head_dim,
                                      dtype=key_states.dtype, device=key_states.device)

    def reserve(self, length: int) -> None:
        """Grow the buffer (doubling) when a write would pass the capacity."""
        if length <= self.capacity:
            return
        while self.capacity < length:
            self.capacity *= 2
        old = self.buffer
        self.buffer = old.new_empty(*old.shape[:4], self.capacity, old.shape[5])
        self.buffer[..., : old.shape[4], :] = old
        for layer in self.layers:
            if layer.is_initialized:
                layer._refresh()

    def filled(self) -> torch.Tensor:
        """[L, 2, B, H, length, Dh] view of what the layers hold (all layers hold the same length)."""
        return self.buffer[..., : self.layers[0].length, :]
