"""SpeculativeDecoder: draft a token tree, verify it in one verifier forward, keep the accepted path.

One step, for every row of the batch at once:
  1. the drafter reads the tokens committed since its last step (the root is the last of them) and drafts
     a tree level by level (a chain is a one-child-per-level tree), plainly through its own LM head or
     aligned through the adapter and the verifier's LM head;
  2. the verifier runs ONE forward over all tree nodes on top of its cache (tree mask + positions);
  3. verify_tree_greedy picks each row's accepted path and bonus token, kv_compact keeps the accepted
     slots; the drafter's tree slots are dropped (its cache holds committed tokens only).
The loop reads one small tensor back per step (accepted lengths and tokens), to emit tokens and stop.

This slice implements greedy (lossless) and sample (lossless in distribution; drafts are the drafter's
deterministic top-k, the case verify_tree_sampling's rule is exact for) decoding with chains and static
or dynamic (EAGLE-2) trees, plain and aligned drafting, and batches with left padding; "feature" mode is the
relaxed, lossy rule (cosine of adapted drafter state vs verifier state), reported in stats.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from sdalign_rt import checks, ops
from sdalign_rt.adapter import BottleneckAdapter
from sdalign_rt.model_runner import ModelRunner
from sdalign_rt.sampling import check_sampling_args, warped_probs
from sdalign_rt.shallow import final_norm, merged_input_embeddings, shallow_view
from sdalign_rt.trees import TreeSpec, ancestor_closure, select_dynamic_tree
from sdalign_rt.vocab import VocabMap

MODES = ("greedy", "sample", "feature")
BUILT_MODES = MODES


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, prompt + new], new tokens padded with pad_token_id after a row ends
    stats: dict = field(default_factory=dict)


def _vocab_size(model, where: str) -> int:
    head = model.get_output_embeddings() if where == "output" else model.get_input_embeddings()
    return head.weight.shape[0]


def _hidden_size(model) -> int:
    return model.get_output_embeddings().weight.shape[1]


class SpeculativeDecoder:
    def __init__(self, target, draft, adapter: BottleneckAdapter | None = None, mode: str = "greedy",
                 tree: TreeSpec | None = None, feature_threshold: float = 0.9, draft_layers: int | None = None,
                 eos_token_id=None, pad_token_id: int | None = None, vocab_map: VocabMap | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        tree = tree if tree is not None else TreeSpec.chain(4)
        if not isinstance(tree, TreeSpec):
            raise ValueError(f"tree must be a TreeSpec, got {type(tree).__name__}")
        self.target, self.draft, self.adapter, self.mode, self.tree = target, draft, adapter, mode, tree
        self.vocab_map = vocab_map
        self.feature_threshold = checks.threshold(feature_threshold)
        self._check_pair()
        # Shallow drafting: the drafter runs its first draft_layers layers only (a weight-sharing view).
        self.draft_layers = draft_layers
        self._draft_runner_model = shallow_view(draft, draft_layers) if draft_layers is not None else draft
        config = getattr(target, "generation_config", None)
        eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
        self.eos_token_ids = set([eos] if isinstance(eos, int) else (eos or []))
        pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
        self._declared_pad = pad
        self.pad_token_id = pad if pad is not None else (min(self.eos_token_ids) if self.eos_token_ids else 0)
        _warn_unapplied_processors(config)
        self._tree_plan: _TreePlan | None = None
        self._head = None

    def _check_pair(self):
        target_vocab = _vocab_size(self.target, "output")
        if self.vocab_map is not None:
            if not isinstance(self.vocab_map, VocabMap):
                raise ValueError(f"vocab_map must be a VocabMap, got {type(self.vocab_map).__name__}")
            sizes = (len(self.vocab_map.to_draft), len(self.vocab_map.to_target))
            if sizes != (target_vocab, _vocab_size(self.draft, "input")):
                raise ValueError(f"vocab_map covers {sizes[0]} verifier / {sizes[1]} drafter ids, but the models "
                                 f"have {target_vocab} / {_vocab_size(self.draft, 'input')}")
        elif self.adapter is None:
            draft_vocab = _vocab_size(self.draft, "output")
            if draft_vocab != target_vocab:
                raise ValueError(f"vocab mismatch: the drafter's LM head has {draft_vocab} tokens and the verifier's "
                                 f"{target_vocab}; plain drafting needs one vocabulary, a vocab_map, or an adapter")
        if self.adapter is not None:
            if not isinstance(self.adapter, BottleneckAdapter):
                raise ValueError(f"adapter must be a BottleneckAdapter, got {type(self.adapter).__name__}")
            draft_hidden, target_hidden = _hidden_size(self.draft), _hidden_size(self.target)
            if (self.adapter.hidden_size, self.adapter.out_size) != (draft_hidden, target_hidden):
                raise ValueError(f"adapter maps {self.adapter.hidden_size} -> {self.adapter.out_size}, but the drafter's "
                                 f"hidden size is {draft_hidden} and the verifier's {target_hidden}")
        if self.mode == "feature" and self.adapter is None and _hidden_size(self.draft) != _hidden_size(self.target):
            raise ValueError(f"feature mode compares hidden states: the drafter's ({_hidden_size(self.draft)}) and the "
                             f"verifier's ({_hidden_size(self.target)}) sizes differ, so it needs an adapter")
        if self.vocab_map is None and _vocab_size(self.draft, "input") < target_vocab:
            raise ValueError(f"vocab mismatch: the drafter embeds {_vocab_size(self.draft, 'input')} token ids but "
                             f"the verifier emits {target_vocab}; pass a vocab_map")

    def _to_draft_ids(self, target_ids: torch.Tensor) -> torch.Tensor:
        if self.vocab_map is None:
            return target_ids
        return self._device_map(target_ids.device).draft_ids(target_ids)

    def _device_map(self, device) -> VocabMap:
        if self.vocab_map.to_draft.device != device:
            self.vocab_map = self.vocab_map.to(device)
        return self.vocab_map

    def _draft_logits(self, logits: torch.Tensor | None, hidden: torch.Tensor | None) -> torch.Tensor:
        """Draft scores: the drafter's own head (plain; a shallow drafter's layer-k state goes through its final
        norm first), or the verifier's head on the adapted state (aligned)."""
        if self.adapter is None:
            if self.draft_layers is not None:
                logits = self.draft.get_output_embeddings()(final_norm(self.draft)(hidden))
            if self.vocab_map is not None:  # the drafter's vocabulary lifted into the verifier's
                logits = self._device_map(logits.device).target_scores(logits, len(self.vocab_map.to_draft))
            return logits
        weight, bias = self._aligned_head()
        return torch.nn.functional.linear(self.adapter(hidden).to(weight.dtype), weight, bias)

    def _aligned_head(self):
        """The verifier's LM head rows aligned drafts are scored with (the adapter's draft_vocab, or all)."""
        head = self.target.get_output_embeddings()
        if self._head is None or self._head[0].device != head.weight.device:
            rows, bias = self.adapter.draft_vocab, getattr(head, "bias", None)
            if bias is not None and rows is not None:
                bias = bias[rows.to(bias.device)]
            self._head = (self.adapter.draft_head(head.weight), bias)
        return self._head

    def _draft_token_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Verifier token ids of top-k indices into the draft scores (a reduced draft vocabulary maps them)."""
        if self.adapter is None or self.adapter.draft_vocab is None:
            return indices
        return self.adapter.draft_vocab.to(indices.device)[indices]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 draft_input_ids: torch.Tensor | None = None, draft_attention_mask: torch.Tensor | None = None,
                 target_inputs: dict | None = None, draft_inputs: dict | None = None,
                 callback: Callable[[list[list[int]]], None] | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None) -> GenerateOutput:
        """Speculative decoding. greedy: token-identical to target.generate(do_sample=False); sample: the
        distribution of target.generate(do_sample=True, temperature=..., top_k=..., top_p=...) (top_k None or
        0 is off, unlike generate's default of 50), with uniforms from `generator`.

        callback, if given, receives after every step the list of tokens each row emitted in it.
        """
        check_sampling_args(temperature, top_k, top_p)
        self._sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self._generator = generator
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        batch = input_ids.shape[0]
        device = input_ids.device
        if attention_mask is None:
            attention_mask = self._infer_attention_mask(input_ids)
        if draft_input_ids is None:  # the verifier's prompt, in the drafter's ids
            draft_input_ids, draft_attention_mask = self._to_draft_ids(input_ids), attention_mask
        elif draft_attention_mask is None:
            draft_attention_mask = self._infer_attention_mask(draft_input_ids)
        if draft_input_ids.shape[0] != batch:
            raise ValueError(f"batch size mismatch: input_ids has {batch} rows, draft_input_ids "
                             f"{draft_input_ids.shape[0]}")
        aligned = self.adapter is not None
        timings = {"draft_s": 0.0, "verify_forward_s": 0.0, "bookkeeping_s": 0.0}
        start = time.perf_counter()

        # Capacity for the common case (rows accept alike); the caches double if garbage slots outgrow it.
        slack = max_new_tokens + self.tree.num_nodes + 2 * (self.tree.depth + 1)
        verifier = ModelRunner(self.target, batch, device, capacity=input_ids.shape[1] + slack)
        drafter = ModelRunner(self._draft_runner_model, batch, device, capacity=draft_input_ids.shape[1] + slack)
        with ops.value_checks(False):
            target_logits, _ = verifier.extend(input_ids, attention_mask, **(target_inputs or {}))
            draft_prefill_inputs = dict(draft_inputs or {})
            if self.draft_layers is not None and draft_prefill_inputs:
                # The k-layer view has no vision path: let the full drafter merge its media into the embeddings.
                draft_prefill_inputs = {"inputs_embeds": merged_input_embeddings(
                    self.draft, draft_input_ids, attention_mask=draft_attention_mask, **draft_prefill_inputs)}
            drafter.extend(draft_input_ids, draft_attention_mask, hidden=aligned, **draft_prefill_inputs)
            root = self._first_token(target_logits[:, -1])
            generated = [[int(t)] for t in root.tolist()]
            finished = [self._ends(row, max_new_tokens) for row in generated]
            pending = root[:, None]
            pending_valid = torch.ones(batch, 1, dtype=torch.bool, device=device)
            stats = _Stats(self.tree.depth)
            if callback:
                callback([list(row) for row in generated])
            while not all(finished):
                t0 = time.perf_counter()
                draft = self._draft_tree(drafter, pending, pending_valid, root, aligned)
                tokens = draft.tokens
                t1 = time.perf_counter()
                tree_start = verifier.length
                accept_nodes, accept_len, bonus, mismatches = self._verify(verifier, draft)
                host = torch.cat([accept_len[:, None], mismatches[:, None], tokens.gather(1, accept_nodes.clamp(min=0)),
                                  bonus[:, None]], dim=1).tolist()  # the one read-back (host sync) of the step
                verifier.keep_accepted(accept_nodes, accept_len, tree_start, max(row[0] for row in host))
                emitted, committed = self._emit_step(host, generated, finished, stats, max_new_tokens)
                stats.steps += 1
                pending, pending_valid = _right_aligned(committed, device)
                root = bonus
                if callback:
                    callback(emitted)
                # Host clocks: exact on CPU; on CUDA they see launches, except where the step syncs.
                timings["draft_s"] += t1 - t0
                timings["verify_forward_s"] += self._forward_s
                timings["bookkeeping_s"] += time.perf_counter() - t1 - self._forward_s
        timings["total_s"] = time.perf_counter() - start
        return GenerateOutput(self._sequences(input_ids, generated), stats.summary(timings, self.tree))

    def _plan(self, device) -> "_TreePlan":
        if self._tree_plan is None or self._tree_plan.tree_mask.device != device:
            self._tree_plan = _TreePlan.build(self.tree, device)
        return self._tree_plan

    def _draft_tree(self, drafter: ModelRunner, pending, pending_valid, root, aligned):
        """Draft this step's tree. Returns a _Draft (tokens[B, N] with node 0 = root, parents, masks, depths).
        The drafter's cache ends holding committed tokens only."""
        hidden_needed = aligned or self.mode == "feature" or self.draft_layers is not None
        # The committed tokens the drafter has not seen (right-aligned, the root last).
        logits, hidden = drafter.extend(self._to_draft_ids(pending), pending_valid, hidden=hidden_needed)
        committed = drafter.length
        root_pos = drafter.next_positions() - 1
        root_hidden = hidden[:, -1:] if hidden_needed else None
        root_logits = self._draft_logits(None if logits is None else logits[:, -1:], root_hidden)[:, 0]
        if self.tree.is_static:
            draft = self._draft_static(drafter, root, root_logits, root_hidden, committed, root_pos)
        else:
            draft = self._draft_dynamic(drafter, root, root_logits, root_hidden, committed, root_pos)
        drafter.crop(committed)
        return draft

    def _draft_static(self, drafter, root, root_logits, root_hidden, committed, root_pos) -> "_Draft":
        batch, device = root.shape[0], root.device
        plan = self._plan(device)
        tokens = torch.empty(batch, plan.nodes, dtype=torch.long, device=device)
        tokens[:, 0] = root
        node_hidden = None
        if root_hidden is not None:
            node_hidden = torch.zeros(batch, plan.nodes, root_hidden.shape[-1], dtype=root_hidden.dtype, device=device)
            node_hidden[:, 0] = root_hidden[:, 0]
        level_logits = [root_logits[:, None]]
        for depth in range(1, self.tree.depth + 1):
            nodes = plan.level_nodes[depth]
            parent_logits = level_logits[depth - 1][:, plan.parent_slot[depth]]
            top = self._draft_token_ids(parent_logits.topk(plan.level_top_k[depth], dim=-1).indices)
            tokens[:, nodes] = top.gather(-1, plan.ranks[nodes].view(1, -1, 1).expand(batch, -1, 1))[..., 0]
            if depth == self.tree.depth:
                break
            # Levels are appended in node order, so the tree slots so far hold nodes 1 .. nodes[0] - 1.
            width = len(nodes)
            past = torch.cat([drafter.valid[:, None, :committed].expand(batch, width, committed),
                              plan.ancestors[nodes][:, 1:int(nodes[0])][None].expand(batch, -1, -1)], dim=-1)
            alone = torch.zeros(batch, width, width, dtype=torch.bool, device=device)
            logits, hidden = drafter.forward(self._to_draft_ids(tokens[:, nodes]), alone,
                                             (root_pos + depth)[:, None].expand(-1, width),
                                             past_mask=past, hidden=node_hidden is not None)
            level_logits.append(self._draft_logits(logits, hidden))
            if node_hidden is not None:
                node_hidden[:, nodes] = hidden
        return _Draft(tokens, plan.parents.expand(batch, -1), plan.tree_mask.expand(batch, -1, -1),
                      plan.depths.expand(batch, -1), node_hidden)

    def _draft_dynamic(self, drafter, root, root_logits, root_hidden, committed, root_pos) -> "_Draft":
        """EAGLE-2: the root's top_k children, then per level the top_k best candidates by cumulative draft
        log-prob are run through the drafter and each proposes top_k children; the best total_tokens
        candidates form the tree. Every row expands its own frontier."""
        k, depth = self.tree.top_k, self.tree.depth
        batch, device = root.shape[0], root.device
        hidden_needed = root_hidden is not None
        logp, top = root_logits.float().log_softmax(-1).topk(k, dim=-1)
        top = self._draft_token_ids(top)
        cand_tokens, cand_scores = [top], [logp]
        cand_parents = [torch.full((batch, k), -1, dtype=torch.long, device=device)]
        forwarded = k * (depth - 1)
        cand_ancestors = [torch.zeros(batch, k, forwarded, dtype=torch.bool, device=device)]
        cand_hidden = []  # (candidate ids, drafter hidden states) of each forwarded frontier
        level_start = 0
        for level in range(1, depth):
            scores = torch.cat(cand_scores, 1)
            level_scores = scores[:, level_start:]
            chosen = level_start + level_scores.topk(k, dim=-1).indices  # candidate ids of the frontier
            tokens = torch.cat(cand_tokens, 1).gather(1, chosen)
            ancestors = torch.cat(cand_ancestors, 1).gather(1, chosen[..., None].expand(-1, -1, forwarded))
            filled = (level - 1) * k
            past = torch.cat([drafter.valid[:, None, :committed].expand(batch, k, committed),
                              ancestors[..., :filled]], dim=-1)
            alone = torch.zeros(batch, k, k, dtype=torch.bool, device=device)
            logits, hidden = drafter.forward(self._to_draft_ids(tokens), alone, (root_pos + level)[:, None].expand(-1, k),
                                             past_mask=past, hidden=hidden_needed)
            child_logp, child_tokens = self._draft_logits(logits, hidden).float().log_softmax(-1).topk(k, dim=-1)
            child_tokens = self._draft_token_ids(child_tokens)
            level_start = scores.shape[1]
            cand_tokens.append(child_tokens.reshape(batch, k * k))
            cand_scores.append((scores.gather(1, chosen)[..., None] + child_logp).reshape(batch, k * k))
            cand_parents.append(chosen[..., None].expand(-1, -1, k).reshape(batch, k * k))
            own_slot = torch.zeros(batch, k, forwarded, dtype=torch.bool, device=device)
            own_slot[:, torch.arange(k), filled + torch.arange(k)] = True
            cand_ancestors.append((ancestors | own_slot)[:, :, None].expand(-1, -1, k, -1).reshape(batch, k * k, forwarded))
            if hidden_needed:
                cand_hidden.append((chosen, hidden))
        parents, tokens, kept = select_dynamic_tree(torch.cat(cand_parents, 1), torch.cat(cand_tokens, 1),
                                                    torch.cat(cand_scores, 1), self.tree.total_tokens)
        tokens[:, 0] = root
        tree_mask, depths = ancestor_closure(parents)
        node_hidden = None
        if hidden_needed:  # nodes never run through the drafter (leaves) keep zeros: they are nobody's parent
            width = root_hidden.shape[-1]
            candidates = sum(scores.shape[1] for scores in cand_scores)
            by_candidate = torch.zeros(batch, candidates, width, dtype=root_hidden.dtype, device=device)
            for chosen, hidden in cand_hidden:
                by_candidate.scatter_(1, chosen[..., None].expand(-1, -1, width), hidden)
            node_hidden = torch.cat([root_hidden, by_candidate.gather(1, kept[..., None].expand(-1, -1, width))], 1)
        return _Draft(tokens, parents, tree_mask, depths, node_hidden)

    def _verify(self, verifier: ModelRunner, draft: "_Draft"):
        """One verifier forward over the tree. Returns (accept_nodes, accept_len, bonus, mismatches[B]):
        mismatches counts accepted drafts that differ from the verifier's argmax (nonzero in feature mode only)."""
        tokens = draft.tokens
        positions = verifier.next_positions()[:, None] + draft.depths
        start = time.perf_counter()
        logits, hidden = verifier.forward(tokens, draft.tree_mask, positions, hidden=self.mode == "feature")
        self._forward_s = time.perf_counter() - start
        argmax = logits.argmax(-1)
        if self.mode == "sample":
            uniform = torch.rand(tokens.shape, generator=self._generator, device=tokens.device)
            accept_nodes, accept_len, bonus = ops.verify_tree_sampling(
                tokens, draft.parents, warped_probs(logits, **self._sampling), uniform, max_depth=self.tree.depth)
        elif self.mode == "feature":
            accept_nodes, accept_len, bonus = self._verify_features(draft, hidden, argmax)
        else:
            accept_nodes, accept_len, bonus = ops.verify_tree_greedy(tokens, draft.parents, argmax,
                                                                     max_depth=self.tree.depth)
        if self.mode != "feature":
            return accept_nodes, accept_len, bonus, torch.zeros_like(accept_len)
        path_nodes = accept_nodes[:, 1:]
        differs = (tokens.gather(1, path_nodes.clamp(min=0)) != argmax.gather(1, accept_nodes[:, :-1].clamp(min=0)))
        return accept_nodes, accept_len, bonus, (differs & (path_nodes >= 0)).sum(-1)

    def _verify_features(self, draft: "_Draft", target_hidden, target_argmax):
        """Relaxed acceptance: node i is accepted when its parent is and the parent's adapted drafter state is
        within the cosine threshold of the verifier's state there (the two states that predict token i)."""
        adapter = self.adapter
        if adapter is not None and adapter.residual:
            normed = adapter.normalize_input(draft.node_hidden)
            _, sims, close, _ = ops.adapter_cosine_accept(
                normed, target_hidden.to(normed.dtype), adapter.down.weight, adapter.down.bias, adapter.up.weight,
                adapter.up.bias, self.feature_threshold, "relaxed")
        else:
            adapted = adapter(draft.node_hidden) if adapter is not None else draft.node_hidden
            _, close, _ = ops.cosine_accept(adapted, target_hidden.to(adapted.dtype), self.feature_threshold, "relaxed")
        # verify_tree_greedy's path rule on "parent is close" flags: node i passes iff close[parent(i)].
        passes = close.gather(1, draft.parents.clamp(min=0)).long()
        accept_nodes, accept_len, _ = ops.verify_tree_greedy(passes, draft.parents, torch.ones_like(passes),
                                                             max_depth=self.tree.depth)
        last = accept_nodes.gather(1, (accept_len - 1)[:, None])
        return accept_nodes, accept_len, target_argmax.gather(1, last)[:, 0]

    def _infer_attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """HF generate's rule: mask the pad token where one is declared, occurs, and is not an EOS id."""
        pad = self._declared_pad
        if pad is None or pad in self.eos_token_ids or not bool((input_ids == pad).any()):
            return torch.ones_like(input_ids)
        return (input_ids != pad).long()

    def _first_token(self, logits: torch.Tensor) -> torch.Tensor:
        if self.mode == "sample":
            return torch.multinomial(warped_probs(logits, **self._sampling), 1, generator=self._generator)[:, 0]
        return logits.argmax(-1)

    def _emit_step(self, host: list, generated: list, finished: list, stats: "_Stats", max_new_tokens: int):
        """Per row, from [accept_len, mismatches, path tokens..., bonus]: the tokens the drafter has not seen
        (accepted drafts + bonus) and those emitted (cut at EOS / max_new_tokens; none for finished rows)."""
        emitted, committed = [], []
        for b, row in enumerate(host):
            length, differ, path, bonus = row[0], row[1], row[2:-1], row[-1]
            committed.append(path[1:length] + [bonus])
            if finished[b]:
                emitted.append([])
                continue
            stats.record(length - 1, differ)
            emitted.append(self._emit(generated[b], committed[b], max_new_tokens))
            finished[b] = self._ends(generated[b], max_new_tokens)
        return emitted, committed

    def _ends(self, row: list[int], max_new_tokens: int) -> bool:
        return len(row) >= max_new_tokens or (bool(row) and row[-1] in self.eos_token_ids)

    def _emit(self, row: list[int], new: list[int], max_new_tokens: int) -> list[int]:
        """Append a step's tokens as plain decoding would: stop at EOS or max_new_tokens."""
        out = []
        for token in new:
            if self._ends(row, max_new_tokens):
                break
            row.append(token)
            out.append(token)
        return out

    def _sequences(self, input_ids, generated) -> torch.Tensor:
        width = max(len(row) for row in generated)
        new = torch.full((len(generated), width), self.pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
        for b, row in enumerate(generated):
            new[b, : len(row)] = torch.tensor(row, dtype=input_ids.dtype)
        return torch.cat([input_ids, new], dim=1)


# Generation-config settings that make target.generate transform the logits; the decoder applies none of them.
_UNAPPLIED = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
              "bad_words_ids": None, "min_length": 0, "min_new_tokens": None, "suppress_tokens": None,
              "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
              "sequence_bias": None, "exponential_decay_length_penalty": None}


def _warn_unapplied_processors(config) -> None:
    set_ = [name for name, default in _UNAPPLIED.items() if getattr(config, name, default) not in (default, None, 0)]
    if set_:
        warnings.warn(f"the verifier's generation_config sets {', '.join(set_)}, which SpeculativeDecoder does not "
                      "apply: its output can differ from target.generate", stacklevel=3)


def _right_aligned(rows: list[list[int]], device):
    """Ragged token rows as [B, K] with each row's tokens at the right end, and the validity mask."""
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        if row:
            tokens[b, width - len(row):] = torch.tensor(row)
            valid[b, width - len(row):] = True
    return tokens.to(device), valid.to(device)


@dataclass
class _Draft:
    """One step's draft tree: tokens[B, N] (node 0 = root), parents[B, N], tree_mask[B, N, N] (self and
    ancestors), depths[B, N], and the drafter's hidden state at each node (feature mode / aligned only)."""
    tokens: torch.Tensor
    parents: torch.Tensor
    tree_mask: torch.Tensor
    depths: torch.Tensor
    node_hidden: torch.Tensor | None = None


@dataclass
class _TreePlan:
    """Everything that depends only on the static tree shape, built once per device (plan once, run many)."""
    nodes: int
    parents: torch.Tensor  # [N]
    ranks: torch.Tensor  # [N]
    depths: torch.Tensor  # [N]
    level_nodes: list  # per depth: node indices
    parent_slot: list  # per depth: index of each node's parent among the previous level's nodes
    level_top_k: list  # per depth: how many top tokens the level's parents must provide
    tree_mask: torch.Tensor  # [N, N] bool: self and ancestors
    ancestors: torch.Tensor  # [N, N] bool: ancestors only

    @classmethod
    def build(cls, tree: TreeSpec, device) -> "_TreePlan":
        parents = torch.tensor(tree.parents(), device=device)
        ranks = torch.tensor(tree.ranks(), device=device)
        masks = ops.build_tree(parents.view(1, -1), 0)
        depths = masks.depth[0]
        level_nodes = [torch.nonzero(depths == d).flatten() for d in range(tree.depth + 1)]
        parent_slot, level_top_k = [None], [None]
        for d in range(1, tree.depth + 1):
            parent_slot.append(torch.searchsorted(level_nodes[d - 1], parents[level_nodes[d]]))
            level_top_k.append(int(ranks[level_nodes[d]].max()) + 1)
        tree_mask = masks.mask[0, 0]
        eye = torch.eye(len(parents), dtype=torch.bool, device=device)
        return cls(len(parents), parents, ranks, depths, level_nodes, parent_slot, level_top_k, tree_mask,
                   tree_mask & ~eye)


class _Stats:
    def __init__(self, depth: int):
        self.depth = depth
        self.steps = 0
        self.row_steps = 0
        self.accepted = 0
        self.per_position = [0] * depth
        self.feature_mismatches = 0

    def record(self, accepted_drafts: int, differ: int = 0):
        self.row_steps += 1
        self.accepted += accepted_drafts
        self.feature_mismatches += differ
        for i in range(accepted_drafts):
            self.per_position[i] += 1

    def summary(self, timings: dict, tree: TreeSpec) -> dict:
        rows = max(self.row_steps, 1)
        return {
            "steps": self.steps,
            "row_steps": self.row_steps,
            "drafted": self.row_steps * tree.total_tokens,
            "accepted": self.accepted,
            "mean_accepted": (self.accepted + self.row_steps) / rows,  # tau: tokens per step, bonus included
            "acceptance_rate": self.accepted / (rows * self.depth),  # alpha per draft depth on the path
            "per_position_acceptance": [c / rows for c in self.per_position],
            # feature mode: accepted drafts that differ from the verifier's own argmax (the price of relaxing)
            "feature_mismatches": self.feature_mismatches,
            "timings": timings,
            "bookkeeping_share_of_verify": timings["bookkeeping_s"] / max(timings["verify_forward_s"], 1e-12),
        }
