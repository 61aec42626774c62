"""SpeculativeDecoder: draft a token tree, verify it in one verifier forward, keep the accepted path.

A generate call: prefill (the verifier's prompt, and the drafter's unless it shares the verifier's cache),
then per step, for every row of the batch at once:

    draft    Drafter.draft: the root (last committed token) and each tree level through the drafter
    verify   one verifier forward over all N tree nodes on top of its cache (tree block + positions)
    accept   verify_tree_greedy / verify_tree_sampling / the feature rule pick each row's path and bonus
    compact  kv_compact keeps the accepted slots in both caches; lengths and biases advance in place
    emit     the step's one read-back (accepted lengths, tokens, flags) streams tokens and decides to stop

Every tensor in a step has a shape fixed by the batch, the tree and the caches' capacity, and nothing but the
read-back leaves the device, so the step's forwards can be compiled and replayed as CUDA graphs.
"""
from __future__ import annotations

import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from sdalign_rt import checks, ops
from sdalign_rt.adapter import BottleneckAdapter
from sdalign_rt.decode_step import MODES, DecodeStep, Mode, Sampling
from sdalign_rt.drafter import Drafter
from sdalign_rt.mask_support import sliding_window
from sdalign_rt.model_runner import learned_position_limit, text_config, uses_lean_forward
from sdalign_rt.sampling import check_sampling_args
from sdalign_rt.shallow import check_draft_layers
from sdalign_rt.tree_plan import TreePlan
from sdalign_rt.trees import LOOKUP_RANK, TreeSpec
from sdalign_rt.vocab import VocabMap
from sdalign_rt.workspace import Workspace, WorkspacePool


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, prompt + new] int64, new tokens padded with pad_token_id after a row ends
    stats: dict = field(default_factory=dict)


def _vocab_size(model, where: str) -> int:
    head = model.get_output_embeddings() if where == "output" else model.get_input_embeddings()
    return head.weight.shape[0]


def _hidden_size(model) -> int:
    return model.get_output_embeddings().weight.shape[1]


class SpeculativeDecoder:
    """Speculative decoding of a verifier (`target`) with drafts from another model (`draft`).

    Parameters
    ----------
    target, draft : transformers causal LMs or VLMs (Llava, Video-LLaVA, EventGPT). They may be one object:
        with ``draft_layers=k`` that is self-speculative decoding from the verifier's first k layers.
    adapter : BottleneckAdapter, optional. Aligned drafting: drafter state -> adapter -> the verifier's LM head.
    mode : "greedy" (lossless), "sample" (lossless in distribution) or "feature" (relaxed, lossy: a node is
        accepted when its parent's adapted drafter state has cosine >= feature_threshold with the verifier's
        state there and it is the drafter's top-ranked child).
    tree : TreeSpec (default chain(4)): chain, static choices or dynamic (EAGLE-2); a static tree may carry a
        context-lookup chain (tree.with_lookup(M): M tokens copied from the text, prompt lookup decoding), also with
        draft=None (TreeSpec.root_only().with_lookup(M)).
    draft_layers : int, optional. Draft from the drafter's first k decoder layers only.
    vocab_map : VocabMap, optional. For pairs whose vocabularies differ (plain drafting).
    lean : None (default) runs LLaMA-family models through the runtime's lean forward and others through
        transformers; False forces the transformers forward; True insists on the lean one.
    compile : torch.compile the forwards (optional, measured; off by default).
    reuse_layers : None (default) lets the verify forward start draft nodes at layer k from the drafter's states
        where the drafter is the verifier's own first k layers, the tree static and the forward lean (LayerSkip's
        reuse: no layer computed twice); False always runs every layer for every node (for comparison).
    graphs : None (default) captures each decode step whole as a CUDA graph on CUDA (a failed capture warns
        and runs eagerly); False keeps steps eager. No effect on the CPU.

    Threads: several threads may call generate on one decoder at once; each call holds its own workspace
    (caches, runners, step objects) from a pool, so each gets exactly what it would get alone. Workspaces are
    kept between calls (with their captured graphs) and reused while batch and capacity fit.

    Example (`model` a LlamaForCausalLM, `adapter` trained by `sdalign-rt train-adapter --draft-layers 2`)::

        decoder = SpeculativeDecoder(target=model, draft=model, adapter=adapter, draft_layers=2,
                                     tree=TreeSpec.static([(0,), (1,), (0, 0)]))
        out = decoder.generate(input_ids, max_new_tokens=64)   # input_ids [B, P] int64, left-padded
        out.sequences                                          # [B, P + 64]
        out.stats["mean_accepted"]                             # tokens per step (tau)
    """

    def __init__(self, target, draft, adapter: BottleneckAdapter | None = None, mode: str = "greedy",
                 tree: TreeSpec | None = None, feature_threshold: float = 0.9, draft_layers: int | None = None,
                 eos_token_id=None, pad_token_id: int | None = None, vocab_map: VocabMap | None = None,
                 lean: bool | None = None, compile: bool = False, graphs: bool | None = None,
                 reuse_layers: bool | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if tree is not None and not isinstance(tree, TreeSpec):
            raise ValueError(f"tree must be a TreeSpec, got {type(tree).__name__}")
        if draft is None:  # plain one-token decoding through the same runtime: the baseline of the lean step
            if (tree is not None and tree.kind != "root") or adapter is not None or draft_layers is not None \
                    or vocab_map is not None:
                raise ValueError("draft=None decodes one token per step (or the root and a context-lookup chain, "
                                 "tree=TreeSpec.root_only().with_lookup(M)): it takes no drafted tree, adapter, "
                                 "draft_layers or vocab_map")
            if mode == "feature":
                raise ValueError("feature mode compares the drafter's states with the verifier's: it needs a drafter")
            tree = tree if tree is not None else TreeSpec.root_only()
        tree = tree if tree is not None else TreeSpec.chain(4)
        if tree.lookup or tree.lookup_top:
            if mode == "feature":
                raise ValueError("feature mode accepts drafts by the drafter's states, which context-lookup nodes do "
                                 "not have: use greedy or sample mode with a lookup tree")
        self.target, self.draft, self.adapter, self.mode, self.tree = target, draft, adapter, Mode(mode), tree
        self.vocab_map = vocab_map
        self.feature_threshold = checks.threshold(feature_threshold)
        self.lean, self.compile, self.graphs = lean, compile, graphs
        if draft is not None:
            self._check_pair()
        if draft_layers is not None:
            check_draft_layers(draft, draft_layers)
        self.draft_layers = draft_layers
        # Which forward each model runs, decided (and refused where it cannot work) before any call.
        target_lean = uses_lean_forward(target, lean, "the verifier")
        if draft is not None:
            uses_lean_forward(draft, lean, "the drafter")
        # Layer reuse: the verify forward starts draft nodes at layer k (static trees on the verifier's own layers).
        self.reuse_layers = bool(reuse_layers is not False and draft is target and draft_layers is not None
                                 and vocab_map is None and tree.is_static and target_lean)
        self.drafter = Drafter(draft, target, tree, adapter=adapter, vocab_map=vocab_map, draft_layers=draft_layers,
                               keep_states=self.mode is Mode.FEATURE, keep_layer_states=self.reuse_layers)
        if tree.lookup and not self.drafter.shares_verifier_cache:
            raise ValueError("a context-lookup chain needs a drafter without a cache of its own (the verifier's "
                             "first layers, draft_layers=k, or draft=None): a drafter with its own cache would "
                             "miss the K/V of accepted lookup tokens")
        config = getattr(target, "generation_config", None)
        eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
        self.eos_token_ids = set([eos] if isinstance(eos, int) else (eos or []))
        pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
        self._declared_pad = pad
        self.pad_token_id = pad if pad is not None else (min(self.eos_token_ids) if self.eos_token_ids else 0)
        _warn_unapplied_processors(config)
        self._pool = WorkspacePool(self._build_workspace)
        self._plans: dict = {}
        self._plans_lock = threading.Lock()

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
        if self.mode is Mode.FEATURE and self.adapter is None and _hidden_size(self.draft) != _hidden_size(self.target):
            raise ValueError(f"feature mode compares hidden states: the drafter's ({_hidden_size(self.draft)}) and the "
                             f"verifier's ({_hidden_size(self.target)}) sizes differ, so it needs an adapter")
        if self.vocab_map is None and _vocab_size(self.draft, "input") < target_vocab:
            raise ValueError(f"vocab mismatch: the drafter embeds {_vocab_size(self.draft, 'input')} token ids but "
                             f"the verifier emits {target_vocab}; pass a vocab_map")

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 draft_input_ids: torch.Tensor | None = None, draft_attention_mask: torch.Tensor | None = None,
                 target_inputs: dict | None = None, draft_inputs: dict | None = None,
                 callback: Callable[[list[list[int]]], None] | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None) -> GenerateOutput:
        """Speculative decoding of a left-padded batch.

        Parameters
        ----------
        input_ids : [B, P] int64, the verifier's prompt, left-padded (right padding is refused).
        max_new_tokens : int >= 1.
        attention_mask : [B, P] (0/1 or bool), optional; inferred from the pad token as generate does.
        draft_input_ids, draft_attention_mask : [B, P_d], the drafter's own prompt (default: the verifier's,
            mapped through vocab_map).
        target_inputs, draft_inputs : dict, extra prefill inputs of each model (pixel_values_videos, events).
        callback : called after the first token and every step with each row's newly emitted tokens.
        temperature, top_k, top_p, generator : sample mode's distribution (as generate applies them; top_k None
            or 0 is off) and the source of its uniforms.

        Returns
        -------
        GenerateOutput. greedy: `sequences` equals target.generate(do_sample=False) token for token (EOS and
        max_new_tokens handled alike, finished rows padded with pad_token_id). `stats`: steps, row_steps (steps
        summed over live rows), drafted, accepted, mean_accepted (tau: tokens per row-step, bonus included),
        acceptance_rate (alpha: accepted drafts / tree depth), per_position_acceptance, accepted_by_depth_rank
        (per depth, accepted drafts counted by their rank among the drafter's candidates), feature_mismatches,
        forward_path ("lean" / "transformers"), timings {draft_s, verify_forward_s, bookkeeping_s, total_s}
        and bookkeeping_share_of_verify. Host clocks: exact on CPU; on CUDA they see launches only.

        Raises ValueError on malformed input (right padding, an all-pad row, a learned position table too short
        for prompt + max_new_tokens) and FloatingPointError when the verifier's logits turn non-finite.
        """
        check_sampling_args(temperature, top_k, top_p)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = self._infer_attention_mask(input_ids)
        prompt_lengths = _prompt_lengths("attention_mask", attention_mask, input_ids)
        if self.drafter.shares_verifier_cache and (draft_input_ids is not None or draft_inputs):
            raise ValueError("this drafter reads the verifier's own cache (the verifier's first layers, or no drafter): "
                             "it takes no draft_input_ids or draft_inputs of its own")
        if draft_input_ids is None:  # the verifier's prompt, in the drafter's ids
            draft_input_ids, draft_attention_mask = self.drafter.draft_ids(input_ids), attention_mask
        elif draft_attention_mask is None:
            draft_attention_mask = self._infer_attention_mask(draft_input_ids)
        if draft_input_ids.shape[0] != batch:
            raise ValueError(f"batch size mismatch: input_ids has {batch} rows, draft_input_ids "
                             f"{draft_input_ids.shape[0]}")
        draft_prompt_lengths = _prompt_lengths("draft_attention_mask", draft_attention_mask, draft_input_ids)
        _check_position_limit(self.target, "the verifier", prompt_lengths, max_new_tokens)
        for model, who in ((self.target, "the verifier"), (self.draft, "the drafter")):
            _check_window(model, who, max(prompt_lengths) + max_new_tokens + self.tree.depth)
        timings = {"draft_s": 0.0, "verify_forward_s": 0.0, "bookkeeping_s": 0.0}
        start = time.perf_counter()
        if not self.drafter.shares_verifier_cache:
            _check_position_limit(self.draft, "the drafter", draft_prompt_lengths, max_new_tokens)
        # A row's cache holds prompt + emitted - 1 tokens while it decodes; its last step may accept up to `depth`
        # more than it emits, and it keeps writing a tree region at that length until every row is done; plus
        # the scratch slot.
        slack = max_new_tokens + self.tree.depth + self.drafter.tree_region + 1
        session = self.session(batch, input_ids.shape[1] + slack, draft_input_ids.shape[1] + slack,
                               temperature=temperature, top_k=top_k, top_p=top_p)
        with session as step, ops.value_checks(False):
            first = step.prefill(input_ids, attention_mask, target_inputs, draft_input_ids, draft_attention_mask,
                                 draft_inputs, generator)  # the prefill's host read
            _raise_if_nonfinite([row[1] for row in first], "the prefill")
            generated = [[row[0]] for row in first]
            finished = [self._ends(row, max_new_tokens) for row in generated]
            live_host = [0 if f else 1 for f in finished]
            if not all(live_host):
                step.set_live(live_host)
            stats = _Stats(self.tree.depth)
            if callback:
                callback([list(row) for row in generated])
            while not all(finished):
                host = step.step(generator, timings)  # the device side, then the one read-back (host sync)
                # Rows that already finished decode on out of sight: their overflow is nobody's error.
                _raise_if_nonfinite([row[2] and alive for row, alive in zip(host, live_host)], f"step {stats.steps + 1}")
                emitted = self._emit_step(host, generated, finished, stats, max_new_tokens)
                stats.steps += 1
                if any(f and bool(was_live) for f, was_live in zip(finished, live_host)):
                    live_host = [0 if f else 1 for f in finished]
                    step.set_live(live_host)  # host -> device: finished rows stop growing
                if callback:
                    callback(emitted)
            forward_path = "lean" if step.verifier.lean else "transformers"
            graphed = step.graph is not None
        timings["total_s"] = time.perf_counter() - start
        summary = stats.summary(timings, self.tree, graphed)
        summary["forward_path"] = forward_path
        return GenerateOutput(self._sequences(input_ids, generated), summary)

    # ---- per-call resources ------------------------------------------------------------------------------------

    @contextmanager
    def session(self, batch: int, verifier_slots: int, drafter_slots: int | None = None, *,
                temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
                ) -> Iterator[DecodeStep]:
        """Hold a workspace (caches of at least these capacities for `batch` rows) for one call and yield its
        DecodeStep for this decoder's tree and the given sampling warp. What generate runs; also the public way
        to time a step's parts (the tree planner) or drive steps from a serving loop. Thread-safe: concurrent
        sessions hold different workspaces."""
        workspace = self._pool.acquire(batch, verifier_slots, drafter_slots or verifier_slots)
        try:
            yield self._step(workspace, Sampling(self.mode, float(temperature), top_k or None, top_p))
        finally:
            self._pool.release(workspace)

    def idle_workspaces(self) -> list[Workspace]:
        """The workspaces (caches, runners, step objects) kept between calls."""
        return self._pool.idle()

    def _build_workspace(self, batch: int, verifier_slots: int, drafter_slots: int) -> Workspace:
        return Workspace.build(self.target, self.draft, batch, verifier_slots, drafter_slots,
                               shared=self.drafter.shares_verifier_cache, draft_layers=self.draft_layers,
                               lean=self.lean, compile=self.compile, graphs=self.graphs is not False)

    def _step(self, workspace: Workspace, sampling: Sampling) -> DecodeStep:
        """The workspace's step object for this sampling (built once: its graph, if any, is captured once)."""
        cache = workspace.verifier.cache
        key = (sampling, cache.dtype)
        step = workspace.steps.get(key)
        if step is None:  # graphs on CUDA only: the step decides from its devices
            step = DecodeStep(self.drafter, workspace, self.tree, self._plan(workspace.batch, cache.device, cache.dtype),
                              sampling, self.feature_threshold, graphs=self.graphs is not False)
            workspace.steps[key] = step
        return step

    def _plan(self, batch: int, device, dtype) -> TreePlan | None:
        if not self.tree.is_static:
            return None
        key = (batch, torch.device(device), dtype)
        with self._plans_lock:
            if key not in self._plans:
                self._plans[key] = TreePlan.build(self.tree, device, dtype, batch)
            return self._plans[key]

    # ---- host side -------------------------------------------------------------------------------------------

    def _infer_attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """HF generate's rule: mask the pad token where one is declared, occurs, and is not an EOS id."""
        pad = self._declared_pad
        if pad is None or pad in self.eos_token_ids or not bool((input_ids == pad).any()):
            return torch.ones_like(input_ids)
        return (input_ids != pad).long()

    def _emit_step(self, host: list, generated: list, finished: list, stats: "_Stats", max_new_tokens: int):
        """Per row, from [accept_len, mismatches, nonfinite, path tokens, path ranks, bonus]: the tokens emitted
        this step (accepted drafts + bonus, cut at EOS / max_new_tokens; none for finished rows)."""
        emitted = []
        width = self.tree.depth + 1
        for b, row in enumerate(host):
            length, differ, path, ranks, bonus = row[0], row[1], row[3:3 + width], row[3 + width:-1], row[-1]
            if finished[b]:
                emitted.append([])
                continue
            stats.record(length - 1, differ, ranks[1:length])
            emitted.append(self._emit(generated[b], path[1:length] + [bonus], max_new_tokens))
            finished[b] = self._ends(generated[b], max_new_tokens)
        return emitted

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
        new = torch.full((len(generated), width), self.pad_token_id, dtype=torch.long)
        for b, row in enumerate(generated):
            new[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        return torch.cat([input_ids, new.to(device=input_ids.device, dtype=input_ids.dtype)], dim=1)


def _raise_if_nonfinite(flags: list, where: str) -> None:
    rows = [b for b, flag in enumerate(flags) if flag]
    if rows:
        raise FloatingPointError(f"the verifier's logits are non-finite (nan or inf) in {where}, batch rows {rows}: "
                                 "check the model's dtype (fp16 overflows) and its inputs")


def _prompt_lengths(name: str, mask: torch.Tensor, input_ids: torch.Tensor) -> list[int]:
    """Each row's token count, after checking that rows are left-padded (0s then 1s) and not empty: one host
    read of the mask, at prefill."""
    if mask.shape != input_ids.shape:
        raise ValueError(f"{name} must have the shape of its input ids {tuple(input_ids.shape)}, got {tuple(mask.shape)}")
    valid = mask.bool()
    # Left padding: once a row's tokens start they never stop.
    right_padded = (valid[:, :-1] & ~valid[:, 1:]).any(-1)
    rows = torch.stack([valid.sum(-1), right_padded.long()], dim=1).tolist()
    empty = [b for b, (count, _) in enumerate(rows) if count == 0]
    if empty:
        raise ValueError(f"{name}: batch rows {empty} hold no token (all padding)")
    right = [b for b, (_, flag) in enumerate(rows) if flag]
    if right:
        raise ValueError(f"{name}: batch rows {right} are right-padded (padding after tokens); pad on the left "
                         "(tokenizer.padding_side = 'left'), as decoder-only generation needs")
    return [count for count, _ in rows]


def _check_position_limit(model, who: str, prompt_lengths: list[int], max_new_tokens: int) -> None:
    limit = getattr(text_config(model), "max_position_embeddings", None)
    if limit is None:
        return
    longest = max(prompt_lengths) + max_new_tokens
    if longest <= limit:
        return
    message = (f"prompt + max_new_tokens = {longest} positions exceed {who}'s max_position_embeddings ({limit})")
    if learned_position_limit(model) is None:
        warnings.warn(f"{message}: past its trained length a rotary model's output may degrade", stacklevel=3)
        return
    raise ValueError(f"{message}: its learned position table has no entry past {limit - 1}")


def _check_window(model, who: str, positions: int) -> None:
    """A sliding window that would bite is an error: the lean forward attends to the whole prefix."""
    window = sliding_window(text_config(model)) if model is not None else None
    if window is not None and positions > window:
        raise ValueError(f"{who} uses sliding-window attention (sliding_window={window}), and prompt + "
                         f"max_new_tokens + the tree's depth reach {positions} positions: past the window the "
                         "runtime's full-prefix attention would differ from the model's; decode fewer tokens")


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


class _Stats:
    def __init__(self, depth: int):
        self.depth = depth
        self.steps = 0
        self.row_steps = 0
        self.accepted = 0
        self.per_position = [0] * depth
        self.by_depth_rank = [{} for _ in range(depth)]  # accepted drafts per depth, counted by sibling rank
        self.feature_mismatches = 0

    def record(self, accepted_drafts: int, differ: int = 0, ranks: list | None = None):
        self.row_steps += 1
        self.accepted += accepted_drafts
        self.feature_mismatches += differ
        for i in range(accepted_drafts):
            self.per_position[i] += 1
        for depth, rank in enumerate(ranks or []):
            self.by_depth_rank[depth][rank] = self.by_depth_rank[depth].get(rank, 0) + 1

    def summary(self, timings: dict, tree: TreeSpec, graphed: bool = False) -> dict:
        rows = max(self.row_steps, 1)
        return {
            "steps": self.steps,
            "row_steps": self.row_steps,
            "drafted": self.row_steps * tree.total_tokens,
            "accepted": self.accepted,
            "mean_accepted": (self.accepted + self.row_steps) / rows,  # tau: tokens per step, bonus included
            "acceptance_rate": self.accepted / (rows * max(self.depth, 1)),  # alpha per draft depth on the path
            "per_position_acceptance": [c / rows for c in self.per_position],
            # accepted drafts at depth d + 1 by their rank among the drafter's candidates (0: its top token)
            # ("lookup": context-lookup nodes)
            "accepted_by_depth_rank": [{("lookup" if r == LOOKUP_RANK else str(r)): c for r, c in sorted(d.items())}
                                       for d in self.by_depth_rank],
            # feature mode: accepted drafts that differ from the verifier's own argmax (the price of relaxing)
            "feature_mismatches": self.feature_mismatches,
            "timings": timings,
            "graphed": graphed,  # a graph replays the whole step: its parts have no host clocks (timings["step_s"])
            "bookkeeping_share_of_verify": (None if graphed else
                                            timings["bookkeeping_s"] / max(timings["verify_forward_s"], 1e-12)),
        }
