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

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.llama import LlamaModel as _TargetLlamaModel
from vllm.model_executor.models.llama_eagle import LlamaDecoderLayer
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix

from sdalign_rt import cpu_linear
from sdalign_rt.vllm_plugin import ARCHITECTURE


def _settings(config) -> dict:
    settings = getattr(config, "sdalign_rt", None)
    if not isinstance(settings, dict):
        raise ValueError("this draft checkpoint's config.json has no `sdalign_rt` block: make the folder with "
                         "`sdalign-rt export-vllm-drafter`")
    return settings


class _Adapter(nn.Module):
    """BottleneckAdapter's inference math (sdalign_rt/adapter.py): RMS input norm, down(x) + context(c), GELU
    (erf), up, residual over the normalised input."""

    def __init__(self, hidden: int, settings: dict):
        super().__init__()
        bottleneck = settings["bottleneck"]
        self.eps = float(settings.get("norm_eps", 1e-5))
        self.norm = nn.Parameter(torch.ones(hidden), requires_grad=False) if settings.get("input_norm") else None
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        self.context = nn.Linear(hidden, bottleneck, bias=False) if settings.get("context_size") else None
        for module in (self.down, self.up, self.context):
            if module is not None:
                module.requires_grad_(False)
        vocab = settings.get("draft_vocab_size")
        self.register_buffer("draft_vocab", None if not vocab else torch.zeros(vocab, dtype=torch.long))

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = hidden.float()
            hidden = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm.float()).to(hidden.dtype)
        pre = self.down(hidden)
        if self.context is not None:
            pre = pre + self.context(context.to(hidden.dtype))
        return hidden + self.up(F.gelu(pre))


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
        self.adapter = _Adapter(config.hidden_size, _settings(config))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        # hidden + residual: the raw residual stream after layer k, what the adapter was trained on.
        return self.adapter(hidden + residual, hidden_states)


class EagleBottleneckLlamaForCausalLM(nn.Module):
    """The drafter: verifier's first k layers -> BottleneckAdapter(., verifier's previous state) -> verifier's head."""

    supports_eagle = True  # vLLM's EAGLE weight bookkeeping (process_eagle_weight) applies to this class
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
        self.settings = _settings(config)
        target_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        # LlamaAttention reads layer_types[layer index - target_layer_count] for draft layers.
        config.target_layer_count = target_layers
        self.model = _DraftModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                 start_layer_id=target_layers)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))
        self._head_rows = None  # (the LM head weight they were gathered from, its draft-vocabulary rows)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs_embeds is not None:
            raise NotImplementedError(f"{type(self).__name__} drafts for text-only targets (no inputs_embeds)")
        states = self.model(input_ids, positions, hidden_states)
        return states, states

    def _draft_rows(self) -> torch.Tensor:
        # vLLM swaps in the target's LM head after load_weights: gather its draft rows on first use, again if
        # the head is ever replaced.
        weight = self.lm_head.weight
        if self._head_rows is None or self._head_rows[0] is not weight:
            self._head_rows = (weight, weight[self.model.adapter.draft_vocab].contiguous())
        return self._head_rows[1]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        vocab = self.model.adapter.draft_vocab
        if vocab is None:
            return self.logits_processor(self.lm_head, hidden_states)
        if get_tensor_model_parallel_world_size() == 1:
            # One rank holds the whole head: score the draft rows only (a sixth of SmolLM2's head), on the CPU
            # through our few-row GEMM orientation (2x F.linear's one-row path there; the same call elsewhere).
            scores = cpu_linear.linear(hidden_states, self._draft_rows())
            logits = scores.new_full((hidden_states.shape[0], self.config.vocab_size), float("-inf"))
            return logits.index_copy_(1, vocab, scores)
        # A vocabulary-parallel head: the full logits (gathered by vLLM), masked to the draft vocabulary.
        logits = self.logits_processor(self.lm_head, hidden_states)
        if logits is None:
            return None
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[vocab] = True
        return logits.masked_fill(~keep, float("-inf"))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # The checkpoint holds the k layers (HF names) and the adapter (adapter.*, kept inside the compiled module).
        renamed = ((f"model.{name}" if name.startswith("adapter.") else name, w) for name, w in weights)
        AutoWeightsLoader(self).load_weights(renamed, mapper=_TargetLlamaModel.hf_to_vllm_mapper)
        # None, not the loaded names: embed_tokens and lm_head are the target's, shared after loading.
        return None
