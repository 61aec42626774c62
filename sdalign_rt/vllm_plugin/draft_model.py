"""vLLM model class of the adapter-aligned shallow drafter (imported by vLLM only; needs vLLM installed).

One call per draft depth, as vLLM's EAGLE proposer makes it (`v1/spec_decode/llm_base_proposer.py`):
    forward(input_ids, positions, hidden_states) -> (states for the LM head, states fed back as hidden_states)
  input_ids      the tokens to draft from (at the root: the token the verifier just emitted);
  hidden_states  at the root: the verifier's final post-norm state at the previous position, i.e. what its LM head
                 read (our adapter's context); deeper: this class's own output for the parent, the adapter's
                 prediction of that state (as our runtime's tree drafting feeds it).
The state is layer k's residual stream of the verifier's own first k decoder layers (copied into the checkpoint,
run on their own KV cache), mapped by the BottleneckAdapter; `compute_logits` scores it with the verifier's LM head
(shared by vLLM) over the adapter's draft vocabulary, -inf elsewhere, so vLLM's greedy draft (an argmax over
the full vocabulary) is the argmax over the draft vocabulary, as in our runtime.

One difference from our runtime, inherent to vLLM's EAGLE path: it feeds token t(j+1) at position j, so the draft
layers' own cache never holds the sequence's first token (RoPE is relative, so the shift itself changes nothing
else). The drafts lose that token's attention mass; acceptance is measured, not assumed
(`bench/bench_vllm.py`). Verification is vLLM's own, so the output is the target's either way.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import (ParallelLMHead, UnquantizedEmbeddingMethod,
                                                                 VocabParallelEmbedding)
from vllm.model_executor.models.llama import LlamaModel as _TargetLlamaModel
from vllm.model_executor.models.llama_eagle import LlamaDecoderLayer
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix

from sdalign_rt import cpu_linear
from sdalign_rt.adapter import BottleneckAdapter
from sdalign_rt.vllm_plugin import ARCHITECTURE


def _settings(config) -> dict:
    settings = getattr(config, "sdalign_rt", None)
    if not isinstance(settings, dict):
        raise ValueError("this draft checkpoint's config.json has no `sdalign_rt` block: make the folder with "
                         "`sdalign-rt export-vllm-drafter`")
    return settings


def _check_target(settings: dict, config, target_config, target_layers: int) -> None:
    """The folder was exported from a verifier of this shape (its layers were copied from one): refuse another."""
    expected = {"decoder layers": (settings.get("target_num_hidden_layers"), target_layers),
                "hidden size": (config.hidden_size, getattr(target_config, "hidden_size", None)),
                "vocabulary": (config.vocab_size, getattr(target_config, "vocab_size", None))}
    wrong = {name: pair for name, pair in expected.items() if pair[0] != pair[1]}
    if wrong:
        raise ValueError("this drafter was exported from another verifier: " + ", ".join(
            f"{name} {draft} in the draft folder, {target} in the target" for name, (draft, target) in wrong.items())
            + " (export it from this target: sdalign-rt export-vllm-drafter --target ...)")


def _adapter(hidden: int, settings: dict) -> BottleneckAdapter:
    """The BottleneckAdapter the folder holds, built empty (its weights and draft vocabulary are loaded)."""
    vocab = settings.get("draft_vocab_size")
    return BottleneckAdapter(hidden, settings["bottleneck"], input_norm=bool(settings.get("input_norm")),
                             norm_eps=float(settings.get("norm_eps", 1e-5)),
                             draft_vocab=torch.arange(vocab) if vocab else None,  # placeholder ids, overwritten
                             context_size=settings.get("context_size")).requires_grad_(False)


# Dimension 0 (tokens) varies; given explicitly (string annotations hide the types from vLLM's inference).
@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "hidden_states": 0})
class _DraftModel(nn.Module):
    """The verifier's first k decoder layers (own copies, own KV cache) and the adapter on layer k's residual
    stream: one module, so that vLLM compiles the whole draft forward as it compiles its own EAGLE heads."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", start_layer_id: int = 0):
        super().__init__()
        config = vllm_config.speculative_config.draft_model_config.hf_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=maybe_prefix(prefix, "embed_tokens"))
        # Attention layers are named after the target's (model.layers.{T + i}) so that their KV caches get
        # indices of their own; the input norm is kept (these are the verifier's layers, not EAGLE's fc input).
        self.layers = nn.ModuleList([
            LlamaDecoderLayer(vllm_config, False, prefix=maybe_prefix(prefix, f"layers.{i + start_layer_id}"),
                              config=config)
            for i in range(config.num_hidden_layers)])
        self.adapter = _adapter(config.hidden_size, _settings(config))
        self.reads_context = self.adapter.context_size is not None

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        # hidden + residual: the raw residual stream after layer k, what the adapter was trained on; the adapter's
        # own math in plain torch ops (BottleneckAdapter.forward_torch), so that torch.compile traces it.
        context = hidden_states if self.reads_context else None
        return self.adapter.forward_torch(hidden + residual, context)


class EagleBottleneckLlamaForCausalLM(nn.Module):
    """The drafter: verifier's first k layers -> BottleneckAdapter(., verifier's previous state) -> verifier's head."""

    # No embeddings or LM head of our own: vLLM's proposer then shares the target's (they are the verifier's).
    has_own_embed_tokens = False
    has_own_lm_head = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        if get_pp_group().world_size > 1:
            # vLLM shares the target's embeddings with a draft only without pipeline parallelism; the exported
            # folder has none of its own, so the draft would embed with uninitialised weights.
            raise NotImplementedError(f"{ARCHITECTURE} needs pipeline_parallel_size 1 (tensor parallelism "
                                      "is supported): vLLM does not share embeddings with drafts across stages")
        config = vllm_config.speculative_config.draft_model_config.hf_config
        self.config = config
        target_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        _check_target(_settings(config), config, vllm_config.model_config.hf_config,
                      vllm_config.model_config.get_total_num_hidden_layers())
        # LlamaAttention reads layer_types[layer index - target_layer_count] for draft layers.
        config.target_layer_count = target_layers
        self.model = _DraftModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                 start_layer_id=target_layers)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))
        # The placeholders vLLM must replace by the target's (weak references: once replaced they are freed);
        # compute_logits refuses to score with them.
        self._placeholders = (weakref.ref(self.lm_head), weakref.ref(self.model.embed_tokens))
        self._head_rows = None  # (the head weight, (its data pointer, its version), the draft vocabulary's rows)
        self._keep = None  # the draft vocabulary as a mask over the full vocabulary (tensor-parallel heads)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs_embeds is not None:
            raise NotImplementedError(f"{type(self).__name__} drafts for text-only targets (no inputs_embeds)")
        states = self.model(input_ids, positions, hidden_states)
        return states, states

    def _draft_rows(self) -> torch.Tensor:
        # vLLM swaps in the target's LM head after load_weights: gather its draft rows on first use, and again if
        # the head is replaced or its weights are updated in place (a weight reload).
        weight = self.lm_head.weight
        storage = (weight.data_ptr(), weight._version)
        cached = self._head_rows
        if cached is None or cached[0] is not weight or cached[1] != storage:
            self._head_rows = (weight, storage, weight[self.model.adapter.draft_vocab].contiguous())
        return self._head_rows[2]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._placeholders[0]() is self.lm_head or self._placeholders[1]() is self.model.embed_tokens:
            raise RuntimeError(f"vLLM did not share the target's embeddings and LM head with {ARCHITECTURE} "
                               "(its placeholders would score the drafts); this vLLM version is not supported")
        vocab = self.model.adapter.draft_vocab
        if vocab is None:
            return self.logits_processor(self.lm_head, hidden_states)
        plain_head = (isinstance(getattr(self.lm_head, "quant_method", None), UnquantizedEmbeddingMethod)
                      and getattr(self.config, "logit_scale", 1.0) == 1.0
                      and not getattr(self.config, "final_logit_softcapping", None))
        if get_tensor_model_parallel_world_size() == 1 and plain_head:
            # One rank holds the whole head: score the draft rows only (a sixth of SmolLM2's head), on the CPU
            # through our few-row GEMM orientation (2x F.linear's one-row path there; the same call elsewhere).
            scores = cpu_linear.linear(hidden_states.to(self.lm_head.weight.dtype), self._draft_rows())
            logits = scores.new_full((hidden_states.shape[0], self.config.vocab_size), float("-inf"))
            return logits.index_copy_(1, vocab, scores)
        # A vocabulary-parallel or quantized head: vLLM's own full logits, masked to the draft vocabulary.
        logits = self.logits_processor(self.lm_head, hidden_states)
        if logits is None:
            return None
        if self._keep is None or self._keep.shape[0] != logits.shape[-1] or self._keep.device != logits.device:
            keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            keep[vocab.to(logits.device)] = True
            self._keep = keep
        return logits.masked_fill(~self._keep, float("-inf"))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The checkpoint holds the k layers (HF names) and the adapter (adapter.*, kept inside the compiled module).
        renamed = ((f"model.{name}" if name.startswith("adapter.") else name, w) for name, w in weights)
        loaded = set(AutoWeightsLoader(self).load_weights(renamed, mapper=_TargetLlamaModel.hf_to_vllm_mapper))
        if self.model.adapter.draft_vocab is not None and "model.adapter.draft_vocab" not in loaded:
            raise ValueError("the draft folder's config names a draft vocabulary but model.safetensors has no "
                             "adapter.draft_vocab: re-export it (sdalign-rt export-vllm-drafter)")
        # Reported as loaded so that vLLM's check (every parameter came from the checkpoint) covers the rest: the
        # embeddings and the head are the target's, shared after loading (compute_logits checks they were).
        return loaded | {"model.embed_tokens.weight", "lm_head.weight"}
