"""ModelRunner: one HF model, its KV cache, and which cache slots each batch row may attend to.

Rows of a batch diverge: prompts are left-padded, each row accepts a different number of drafts per step.
Rather than ragged caches, every row shares one physical slot axis and `valid[B, S]` marks the slots that
hold a committed token of that row; padding and rejected slots stay in the cache, masked out. Positions are
logical: a row's next position is its count of valid slots, which is what HF generate's left-padding
position_ids give, so the verifier sees exactly the positions of plain decoding.
"""
from __future__ import annotations

import inspect

import torch

from sdalign_rt import ops


class ModelRunner:
    def __init__(self, model, batch: int, device, capacity: int = 1024):
        self.model = model
        self.cache = _new_cache(model, capacity)
        self._cache_arg = _cache_keyword(model)
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.dtype = next(model.parameters()).dtype

    @property
    def length(self) -> int:
        """Physical cache length (slots), the same for every row."""
        return self.valid.shape[1]

    def next_positions(self) -> torch.Tensor:
        return self.valid.sum(-1)

    def forward(self, tokens: torch.Tensor, block_mask: torch.Tensor, positions: torch.Tensor,
                token_valid: torch.Tensor | None = None, past_mask: torch.Tensor | None = None,
                hidden: bool = False, **model_inputs):
        """Run tokens[B, K] on top of the cache and append their K/V.

        block_mask[B, K, K]: which block tokens each token sees (itself included). past_mask[B, K, S]: which
        cached slots it sees (default: the row's valid slots). token_valid[B, K]: slots to mark valid after
        the call (default: all). Invalid queries still see themselves, so no softmax row is empty.
        Returns (logits[B, K, V], last hidden state[B, K, D] or None); a model without an LM head (a
        shallow-drafting view) returns (None, last hidden state).
        """
        batch, k = tokens.shape
        if past_mask is None:
            past_mask = self.valid[:, None, :].expand(batch, k, self.length)
        own = torch.eye(k, dtype=torch.bool, device=tokens.device)
        visible = torch.cat([past_mask, block_mask | own], dim=-1)
        bias = torch.zeros(visible.shape, dtype=self.dtype, device=tokens.device)
        bias.masked_fill_(~visible, torch.finfo(self.dtype).min)
        if model_inputs.get("inputs_embeds") is not None:  # precomputed (media-merged) embeddings of the tokens
            tokens_in = None
        else:
            tokens_in = tokens
        out = self.model(input_ids=tokens_in, attention_mask=bias[:, None], position_ids=positions,
                         **{self._cache_arg: self.cache}, use_cache=True, output_hidden_states=hidden,
                         **model_inputs)
        if token_valid is None:
            token_valid = torch.ones(batch, k, dtype=torch.bool, device=tokens.device)
        self.valid = torch.cat([self.valid, token_valid], dim=1)
        logits = getattr(out, "logits", None)
        if logits is None:  # a decoder stack (shallow drafting view): no head, its last state is the output
            return None, out.last_hidden_state
        return logits, (out.hidden_states[-1] if hidden else None)

    def extend(self, tokens: torch.Tensor, valid: torch.Tensor, hidden: bool = False, **model_inputs):
        """Append a block of committed tokens whose rows are padded (valid[B, K] False): causal within the
        block, padding masked out, positions continuing each row's count. On an empty cache this is the
        left-padded prompt's prefill (positions from 0 per row)."""
        k = tokens.shape[1]
        valid = valid.bool()
        causal = torch.ones(k, k, dtype=torch.bool, device=tokens.device).tril()
        positions = self.next_positions()[:, None] + (valid.long().cumsum(-1) - 1).clamp(min=0)
        return self.forward(tokens, causal[None] & valid[:, None, :], positions, token_valid=valid, hidden=hidden,
                            **model_inputs)

    def crop(self, length: int) -> None:
        remove = self.length - length
        if remove > 0:
            self.cache.crop(-remove)  # a negative count removes tokens in transformers 4.x and 5.x alike
        self.valid = self.valid[:, :length]

    def keep_accepted(self, accept_nodes: torch.Tensor, accept_len: torch.Tensor, tree_start: int,
                      longest: int) -> None:
        """After a tree forward at slots [tree_start, tree_start + N): move each row's accepted nodes to the
        front of the tree region (kv_compact), drop the rest of the region beyond the longest row, and mark
        each row's accepted slots valid."""
        ops.kv_compact(self.cache.filled() if hasattr(self.cache, "filled") else self.cache, accept_nodes, tree_start)
        self.crop(tree_start + longest)
        steps = torch.arange(longest, device=accept_len.device)
        self.valid[:, tree_start:] = steps[None, :] < accept_len[:, None]


def _cache_keyword(model) -> str:
    """transformers renamed past_key_values to cache (5.2x); older releases only know the first name. A
    subclass forward taking **kwargs hides it, so look up the class hierarchy for the first that names one."""
    for cls in type(model).__mro__:
        forward = cls.__dict__.get("forward")
        if forward is None:
            continue
        parameters = inspect.signature(forward).parameters
        for name in ("cache", "past_key_values"):
            if name in parameters:
                return name
    return "past_key_values"


def _new_cache(model, capacity: int):
    """A PreallocatedCache when this transformers has the layered cache API, else its DynamicCache."""
    try:
        from sdalign_rt.kv_cache import PreallocatedCache
    except ImportError:
        from transformers import DynamicCache

        return DynamicCache()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return PreallocatedCache(config.num_hidden_layers, capacity)
