"""The fallback forward: transformers' own decoder forward over a StaticKVCache, for architectures the lean
forward does not cover (GPT-2, GPT-NeoX, ...).

Same call as LeanLlamaForward: (embeds[B, T, D], positions[B, T], slots[B, T], bias[B, 1, T, capacity]) ->
hidden [B, T, D]. The decoder stack (`model.get_decoder()`, or a shallow view of its first k layers) runs
with `inputs_embeds`, explicit `position_ids`, our additive 4D bias (transformers uses a 4D mask as given)
and a transformers Cache adaptor, built once, whose layers scatter the new K/V into their slots and hand
attention the whole fixed-capacity buffers.
"""
from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer

from sdalign_rt.kv_cache import CacheMask, StaticKVCache
from sdalign_rt.mask_support import check_mask_respected
from sdalign_rt.shallow import shallow_view_of_decoder

class _SlotLayer(DynamicLayer):
    def __init__(self, cache: StaticKVCache, index: int):
        super().__init__()
        self.static, self.index = cache, index
        self.slot_index: torch.Tensor | None = None

    def lazy_initialization(self, key_states, value_states, *args, **kwargs) -> None:
        self.keys, self.values = self.static.layer(self.index)
        self.device = self.keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        StaticKVCache.write(self.keys, self.values, key_states, value_states, self.slot_index)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0  # positions always come explicitly; nothing may infer them from a fill level

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.static.capacity, 0


class _SlotCache(Cache):
    def __init__(self, cache: StaticKVCache, num_layers: int):
        self.slot_layers = [_SlotLayer(cache, i) for i in range(num_layers)]
        super().__init__(layers=self.slot_layers)

    def set_slots(self, slots: torch.Tensor, heads: int, head_dim: int) -> None:
        batch, tokens = slots.shape
        for layer in self.slot_layers:
            device = layer.static.layer_device(layer.index)
            layer.slot_index = slots.to(device)[:, None, :, None].expand(batch, heads, tokens, head_dim)


class TransformersForward:
    """Runs `decoder` (a model's decoder stack; its first num_layers layers when given) through transformers."""

    def __init__(self, decoder, cache: StaticKVCache, num_layers: int | None = None):
        check_mask_respected(decoder.config, type(decoder).__name__)
        total = decoder.config.num_hidden_layers
        self.num_layers = total if num_layers is None else num_layers
        # A given num_layers means shallow drafting: the raw layer-k output, no final norm (even for k = all).
        self.stack = decoder if num_layers is None else shallow_view_of_decoder(decoder, self.num_layers)
        self.cache = cache
        self._adaptor = _SlotCache(cache, self.num_layers)
        self._cache_keyword = _cache_keyword(self.stack)
        keys, _ = cache.layer(0)
        self._heads, self._head_dim = keys.shape[1], keys.shape[-1]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.stack.get_input_embeddings()(token_ids)

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
        if isinstance(bias, CacheMask):
            bias = bias.dense()
        self._adaptor.set_slots(slots, self._heads, self._head_dim)
        out = self.stack(inputs_embeds=embeds, attention_mask=bias, position_ids=positions, use_cache=True,
                         **{self._cache_keyword: self._adaptor})
        return out.last_hidden_state


def _cache_keyword(module) -> str:
    """transformers renamed past_key_values to cache (5.2x); older 5.x releases only know the first name. A
    subclass forward taking **kwargs hides it, so look up the class hierarchy for the first that names one."""
    for cls in type(module).__mro__:
        forward = cls.__dict__.get("forward")
        if forward is None:
            continue
        parameters = inspect.signature(forward).parameters
        for name in ("cache", "past_key_values"):
            if name in parameters:
                return name
    return "past_key_values"
