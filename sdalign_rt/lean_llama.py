"""The lean forward of LLaMA-family decoders: the model's own modules over a StaticKVCache.

transformers' forward builds a mask and a cache object per call and runs ~200 Python-level ops per layer
around the matmuls. Here one call is: embeddings in, for each layer its own RMSNorm, q/k/v/o projections
(called as modules, so bitsandbytes 4-bit layers keep working), the model's rotary embedding and its
`apply_rotary_pos_emb`, a scatter of the new K/V into their slots, one SDPA over the whole fixed-capacity
cache under the caller's additive bias, the MLP module; no transformers mask or cache object, no shape that
depends on how full the cache is. Weights are the model's (nothing is copied or rewritten), so the output is
the model's up to the rounding of a different attention reduction.

Covered: decoders whose layers are transformers' LLaMA-shaped layers (LEAN_LAYERS): LlamaForCausalLM (SmolLM2,
Vicuna), EventGPT's language model, the language models inside Llava and Video-LLaVA, Mistral, Qwen2 / Qwen2.5
(q/k/v biases: the projections are the modules themselves) and Qwen3 (per-head q/k norms). A sliding window is
allowed where it never bites: generate refuses prompt + new tokens past it. Others use TransformersForward.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from sdalign_rt import ops
from sdalign_rt.cpu_linear import project
from sdalign_rt.kv_cache import CacheMask, StaticKVCache


# Decoder layers built like LLaMA's: pre-norm attention (q/k/v/o projections; Qwen2's with biases, Qwen3's with
# per-head RMSNorms on q and k), pre-norm gated MLP, rotary positions from the decoder's own rotary module.
LEAN_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def _lean_layer(layer) -> bool:
    names = {cls.__name__ for cls in type(layer).__mro__}
    if not names.intersection(LEAN_LAYERS):
        return False
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return (all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))
            and all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
            and hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm"))


def lean_unsupported(decoder) -> str | None:
    """None if `decoder` (a model's decoder stack) can run lean, else why not."""
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(_lean_layer(layer) for layer in layers):
        return f"{type(decoder).__name__} is not a stack of {' / '.join(LEAN_LAYERS)}"
    for name in ("embed_tokens", "norm", "rotary_emb"):
        if getattr(decoder, name, None) is None:
            return f"{type(decoder).__name__} has no {name}"
    # accelerate's offloading hooks load weights when a whole layer is called; the lean forward calls the
    # layer's parts, so offloaded weights would never arrive.
    if any(getattr(getattr(module, "_hf_hook", None), "offload", False) for module in decoder.modules()):
        return "some of its weights are offloaded by accelerate (cpu / disk)"
    return None


class LeanLlamaForward:
    """Runs a LLaMA decoder: all its layers and its final norm (num_layers=None), or its first num_layers
    layers with no norm (shallow drafting: the raw layer-k output, as output_hidden_states[k] gives it).

    Call: (embeds[B, T, D], positions[B, T] int64, slots[B, T] int64, mask) -> hidden [B, T, D], the mask a
    CacheMask (StaticKVCache.mask) or a dense additive bias [B, 1, T, capacity]. The K/V of the T tokens land in
    `cache` at `slots`.
    """

    def __init__(self, decoder, cache: StaticKVCache, num_layers: int | None = None):
        reason = lean_unsupported(decoder)
        if reason is not None:
            raise ValueError(f"no lean forward: {reason}")
        total = len(decoder.layers)
        self.num_layers = total if num_layers is None else num_layers
        if not 1 <= self.num_layers <= min(total, cache.num_layers):
            raise ValueError(f"num_layers must be in [1, {min(total, cache.num_layers)}], got {self.num_layers}")
        self.decoder, self.cache = decoder, cache
        self.layers = list(decoder.layers)[: self.num_layers]
        self.norm = decoder.norm if num_layers is None else None
        self.rotary = decoder.rotary_emb
        attention = self.layers[0].self_attn
        # The rotary application of the attention's own modeling module (LLaMA's, or a subclass's override).
        self._apply_rope = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        self.head_dim = attention.head_dim
        self._qk_norm = getattr(attention, "q_norm", None) is not None
        self.heads = decoder.config.num_attention_heads
        self.kv_heads = decoder.config.num_key_value_heads
        self._devices = [cache.layer_device(i) for i in range(self.num_layers)]
        # Decode-time attention: "auto" runs sd.ops.tree_attention on CUDA (cost follows the committed length, no
        # dense mask) and SDPA over the dense bias elsewhere; "sdpa" / "kernel" force one (benchmarks, tests).
        self.attention = os.environ.get("SDALIGN_RT_ATTENTION", "auto")
        if self.attention not in ("auto", "sdpa", "kernel"):
            raise ValueError(f"SDALIGN_RT_ATTENTION must be auto, sdpa or kernel, got {self.attention!r}")

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(token_ids)

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 bias: torch.Tensor, layers: tuple[int, int] | None = None, norm: bool = True) -> torch.Tensor:
        """layers=(start, stop): run layers [start, stop) only, `embeds` being layer start's input; the final norm
        of a full model applies when stop is its last layer and `norm` holds (a raw layer-k state of a model with
        k layers in all needs norm=False). The verify forward starts draft nodes at layer k from the states
        shallow drafting computed (LayerSkip's reuse)."""
        batch, tokens = embeds.shape[:2]
        start, stop = layers if layers is not None else (0, self.num_layers)
        hidden = embeds
        per_device = {}  # what each device's layers share: rotary tables, the bias, the slot index
        for index in range(start, stop):
            layer = self.layers[index]
            device = self._devices[index]
            if device not in per_device:
                hidden = hidden.to(device)
                cos, sin = (t.to(device) for t in self.rotary(hidden, positions.to(device)))
                slot_index = slots.to(device)[:, None, :, None].expand(batch, self.kv_heads, tokens, self.head_dim)
                per_device[device] = (cos, sin, self._device_mask(bias, device, tokens), slot_index)
            cos, sin, device_bias, slot_index = per_device[device]
            hidden = self._layer(layer, index, hidden, cos, sin, device_bias, slot_index)
        if self.norm is not None and norm and stop == self.num_layers:
            hidden = self.norm(hidden)
        return hidden

    def _device_mask(self, mask, device, tokens: int):
        """The mask as this device's attention takes it: tree_attention's parts (a tuple) where the kernel runs
        (CUDA, decode widths), else a dense additive bias [B, 1, T, capacity]."""
        if not isinstance(mask, CacheMask):
            return mask.to(device)
        group_rows = self.heads // self.kv_heads * tokens
        if self.attention == "kernel" or (self.attention == "auto" and device.type == "cuda"
                                          and group_rows <= ops.MAX_ATTENTION_ROWS and ops.triton_available()):
            return mask.parts(device)
        return mask.dense().to(device)

    def _layer(self, layer, index, hidden, cos, sin, bias, slot_index):
        batch, tokens = hidden.shape[:2]
        attention = layer.self_attn
        x = layer.input_layernorm(hidden)
        # q [B, H, T, Dh]; k, v [B, H_kv, T, Dh] (Qwen3 normalises each head of q and k before the rotation)
        q = project(attention.q_proj, x).view(batch, tokens, self.heads, self.head_dim)
        k = project(attention.k_proj, x).view(batch, tokens, self.kv_heads, self.head_dim)
        if self._qk_norm:
            q, k = attention.q_norm(q), attention.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = project(attention.v_proj, x).view(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self._apply_rope(q, k, cos, sin)
        keys, values = self.cache.layer(index)
        StaticKVCache.write(keys, values, k, v, slot_index)
        if isinstance(bias, tuple):  # only the slots each row uses (sd.ops.tree_attention)
            out = ops.tree_attention(q.to(keys.dtype), keys, values, *bias, scale=attention.scaling).to(q.dtype)
        else:
            out = _attention(q, keys, values, bias, attention.scaling)
        hidden = hidden + project(attention.o_proj, out.transpose(1, 2).reshape(batch, tokens, -1))
        x = layer.post_attention_layernorm(hidden)
        mlp = layer.mlp  # LlamaMLP's own formula, its projections through `project`
        return hidden + project(mlp.down_proj, mlp.act_fn(project(mlp.gate_proj, x)) * project(mlp.up_proj, x))


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
               scale: float) -> torch.Tensor:
    """SDPA of q [B, H, T, Dh] over the cache keys / values [B, H_kv, S, Dh] under bias [B, 1, T, S].

    Grouped-query heads are folded into the query axis ([B, H_kv, G * T, Dh], the bias repeated per group) rather
    than passed as enable_gqa: with a mask, PyTorch's CUDA SDPA sends enable_gqa to the math kernel, which
    materialises [B, H, T, S] scores in fp32; folded, the memory-efficient kernel takes it. Same sums, same result.
    """
    batch, heads, tokens, head_dim = q.shape
    kv_heads = keys.shape[1]
    if heads == kv_heads:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale)
    group = heads // kv_heads
    folded = q.reshape(batch, kv_heads, group * tokens, head_dim)  # head h = kv head h // G, group member h % G
    folded_bias = bias[:, :, None].expand(batch, 1, group, tokens, bias.shape[-1]).reshape(
        batch, 1, group * tokens, bias.shape[-1])
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=folded_bias, scale=scale)
    return out.view(batch, heads, tokens, head_dim)
