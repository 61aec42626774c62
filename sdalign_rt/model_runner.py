"""ModelRunner: one model of the pair behind one narrow call, over its StaticKVCache.

    hidden = runner.forward(embeds[B, T, D], positions[B, T], slots[B, T], bias[B, 1, T, capacity])

writes the T tokens' K/V at `slots` and returns their last hidden states (post final norm for a full model,
the raw layer-k output for a shallow one). Tree nodes share positions (length + depth) while each has its own
slot (length + node index), so positions are the caller's. The forward
is the lean LLaMA forward where the architecture allows it, else transformers' own (TransformersForward);
`prefill` runs a left-padded prompt (media merged into the embeddings by the model's own code) and
`logits` applies the LM head only to the states it is given.
"""
from __future__ import annotations

import torch

from sdalign_rt.cpu_linear import project
from sdalign_rt.kv_cache import StaticKVCache, additive
from sdalign_rt.lean_llama import LeanLlamaForward, lean_unsupported
from sdalign_rt.mask_support import check_mask_respected
from sdalign_rt.shallow import decoder_layers, merged_input_embeddings


def text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def new_cache(model, batch: int, capacity: int, num_layers: int | None = None) -> StaticKVCache:
    """A StaticKVCache for `model`'s first num_layers decoder layers (all by default), one buffer per device."""
    config = text_config(model)
    layers = list(decoder_layers(model))[:num_layers]
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    devices = [next(layer.parameters()).device for layer in layers]
    dtype = model.get_input_embeddings().weight.dtype  # the hidden states' dtype (4-bit layers keep it)
    return StaticKVCache(devices, batch, kv_heads, head_dim, capacity, dtype)


def uses_lean_forward(model, lean: bool | None, who: str = "the model") -> bool:
    """Which forward `model` runs: the lean one where its architecture allows (lean=None), or as forced.
    Raises where the choice cannot work: lean=True on another architecture, or a transformers forward whose
    attention would ignore the tree mask."""
    reason = lean_unsupported(model.get_decoder())
    if lean and reason is not None:
        raise ValueError(f"lean=True, but {who} ({type(model).__name__}) has no lean forward: {reason}")
    use_lean = reason is None if lean is None else bool(lean)
    if not use_lean:
        check_mask_respected(model.get_decoder().config, f"{who} ({type(model).__name__})")
    return use_lean


class ModelRunner:
    def __init__(self, model, cache: StaticKVCache, num_layers: int | None = None, lean: bool | None = None):
        """lean: None picks the lean forward where the architecture allows it; True insists; False forces the
        transformers fallback (tests run both)."""
        self.model, self.cache = model, cache
        self.lean = uses_lean_forward(model, lean)
        if self.lean:
            self._forward = LeanLlamaForward(model.get_decoder(), cache, num_layers)
        else:
            from sdalign_rt.hf_forward import TransformersForward  # transformers only where it runs

            self._forward = TransformersForward(model.get_decoder(), cache, num_layers)
        self._run = self._forward  # the call itself (replaced by its compiled version)
        self._graphed = False  # CUDA graphs: a replay overwrites the previous replay's output
        self.position_limit = learned_position_limit(model)

    @torch.no_grad()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._forward.embed(token_ids)

    def compile(self, graphs: bool = True) -> None:
        """torch.compile the forward (fixed shapes: one graph per width). On CUDA with `graphs`, mode
        "reduce-overhead" replays CUDA graphs of the forward alone: the cache buffers and their per-layer views are
        marked static so the graphs write them in place, and each output is cloned (the next replay would
        overwrite it). graphs=False when a whole-step CUDA graph captures the compiled forward instead."""
        cuda = self.cache.device.type == "cuda"
        graphed = cuda and graphs
        # The drafter's and the verifier's runners share one code object (LeanLlamaForward.__call__), and each
        # width is its own graph: their entries fill one per-code cache, whose default limit (8) would send the
        # rest to eager without a word. Room for both runners' widths and layer slices:
        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), 64))
        if graphed:
            for tensor in self.cache.static_tensors():
                torch._dynamo.mark_static_address(tensor)
        self._run = torch.compile(self._forward, mode="reduce-overhead" if graphed else None, dynamic=False)
        self._graphed = graphed

    @property
    def num_layers(self) -> int:
        return self._forward.num_layers

    @torch.no_grad()
    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                bias: torch.Tensor, layers: tuple[int, int] | None = None, norm: bool = True) -> torch.Tensor:
        """layers=(start, stop) runs a slice of the layers, norm=False leaves out the final norm (lean forward
        only; see LeanLlamaForward)."""
        if layers is None:
            hidden = self._run(embeds, self._clamp(positions), slots, bias)
        else:
            hidden = self._run(embeds, self._clamp(positions), slots, bias, layers, norm)
        if self._graphed:  # the drafter keeps a level's states while the same graph runs the next level
            hidden = hidden.clone()
        # Back to where the bookkeeping lives (a model split over devices ends on its last one).
        return hidden.to(self.cache.device)

    def _clamp(self, positions: torch.Tensor) -> torch.Tensor:
        if self.position_limit is None:
            return positions
        # Tree nodes past the table are never emitted (generate refuses prompts + new tokens past it).
        return positions.clamp(max=self.position_limit - 1)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, media: dict | None = None,
                last_only: bool = True, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Run a left-padded prompt [B, P] into empty slots [0, P). Returns the hidden state at the last
        position [B, D] (or all [B, P, D]). Media (pixel values, events) are merged by the model's own code;
        embeds [B, P, D] gives the first layer's input directly (media already merged)."""
        batch, length = input_ids.shape
        self.cache.check_room(length, "the prompt")
        valid = attention_mask.bool()
        if embeds is None:
            embeds = (merged_input_embeddings(self.model, input_ids, attention_mask=attention_mask, **media) if media
                      else self.embed(input_ids))
        starts = length - valid.sum(-1)
        self.cache.reset(starts, starts)  # nothing committed yet: the block below is all a row sees
        index = torch.arange(length, device=input_ids.device)
        # Causal over real tokens; a pad query sees itself only, so no softmax row is empty.
        visible = ((index[None, :, None] >= index[None, None, :]) & valid[:, None, :]) | torch.eye(
            length, dtype=torch.bool, device=input_ids.device)
        block = additive(visible, self.cache.dtype)
        slots = index.expand(batch, length)
        start_offset = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        positions = (index[None, :] - starts[:, None]).clamp(min=0)  # HF generate's left-padding positions
        # Eager even when compiled: prompt lengths vary, and one graph per length would never pay.
        hidden = self._forward(embeds, self._clamp(positions), slots, self.cache.attention_bias(block, start_offset))
        self.cache.reset(starts, torch.full_like(starts, length))
        return hidden[:, -1] if last_only else hidden

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's LM head on these states only ([..., D] -> [..., V])."""
        return project(self.model.get_output_embeddings(), hidden).to(self.cache.device)


def learned_position_limit(model) -> int | None:
    """The size of a learned position table (GPT-2's wpe), which indexes out of range past it; None for rotary
    models, which have no hard limit."""
    if any("rotary" in name.lower() for name, _ in model.get_decoder().named_modules()):
        return None
    return getattr(text_config(model), "max_position_embeddings", None)
