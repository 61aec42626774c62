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
trees, plain and aligned drafting, and batches with left padding; "feature" mode and dynamic trees are not
built yet.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from sdalign_rt import ops
from sdalign_rt.adapter import BottleneckAdapter
from sdalign_rt.model_runner import ModelRunner
from sdalign_rt.sampling import check_sampling_args, warped_probs
from sdalign_rt.trees import TreeSpec

MODES = ("greedy", "sample", "feature")
BUILT_MODES = ("greedy", "sample")


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
                 eos_token_id=None, pad_token_id: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode not in BUILT_MODES:
            raise NotImplementedError(f"mode={mode!r} is not implemented yet (built: {BUILT_MODES})")
        if draft_layers is not None:
            raise NotImplementedError("draft_layers (shallow drafting) is not implemented yet")
        tree = tree if tree is not None else TreeSpec.chain(4)
        if not isinstance(tree, TreeSpec):
            raise ValueError(f"tree must be a TreeSpec, got {type(tree).__name__}")
        if not tree.is_static:
            raise NotImplementedError("dynamic trees are not implemented in the decoding loop yet")
        self.target, self.draft, self.adapter, self.mode, self.tree = target, draft, adapter, mode, tree
        self.feature_threshold = feature_threshold
        self._check_pair()
        config = getattr(target, "generation_config", None)
        eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
        self.eos_token_ids = set([eos] if isinstance(eos, int) else (eos or []))
        pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else (min(self.eos_token_ids) if self.eos_token_ids else 0)
        self._tree_plan: _TreePlan | None = None

    def _check_pair(self):
        target_vocab = _vocab_size(self.target, "output")
        if self.adapter is None:
            draft_vocab = _vocab_size(self.draft, "output")
            if draft_vocab != target_vocab:
                raise ValueError(f"vocab mismatch: the drafter's LM head has {draft_vocab} tokens and the verifier's "
                                 f"{target_vocab}; plain drafting needs one vocabulary (or an adapter)")
        else:
            if not isinstance(self.adapter, BottleneckAdapter):
                raise ValueError(f"adapter must be a BottleneckAdapter, got {type(self.adapter).__name__}")
            draft_hidden, target_hidden = _hidden_size(self.draft), _hidden_size(self.target)
            if (self.adapter.hidden_size, self.adapter.out_size) != (draft_hidden, target_hidden):
                raise ValueError(f"adapter maps {self.adapter.hidden_size} -> {self.adapter.out_size}, but the drafter's "
                                 f"hidden size is {draft_hidden} and the verifier's {target_hidden}")
        if _vocab_size(self.draft, "input") < target_vocab:
            raise ValueError(f"vocab mismatch: the drafter embeds {_vocab_size(self.draft, 'input')} token ids but "
                             f"the verifier emits {target_vocab}")

    def _draft_logits(self, logits: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        if self.adapter is None:
            return logits
        return self.target.get_output_embeddings()(self.adapter(hidden))

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
            attention_mask = torch.ones_like(input_ids)
        if draft_input_ids is None:
            draft_input_ids, draft_attention_mask = input_ids, attention_mask
        elif draft_attention_mask is None:
            draft_attention_mask = torch.ones_like(draft_input_ids)
        if draft_input_ids.shape[0] != batch:
            raise ValueError(f"batch size mismatch: input_ids has {batch} rows, draft_input_ids "
                             f"{draft_input_ids.shape[0]}")
        aligned = self.adapter is not None
        timings = {"draft_s": 0.0, "verify_s": 0.0, "bookkeeping_s": 0.0}
        start = time.perf_counter()

        verifier = ModelRunner(self.target, batch, device)
        drafter = ModelRunner(self.draft, batch, device)
        with ops.value_checks(False):
            target_logits, _ = verifier.prefill(input_ids, attention_mask, **(target_inputs or {}))
            drafter.prefill(draft_input_ids, draft_attention_mask, hidden=aligned, **(draft_inputs or {}))
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
                tokens = self._draft_tree(drafter, pending, pending_valid, root, aligned)
                t1 = time.perf_counter()
                accept_nodes, accept_len, bonus = self._verify(verifier, tokens)
                t2 = time.perf_counter()
                host = torch.cat([accept_len[:, None], tokens.gather(1, accept_nodes.clamp(min=0)),
                                  bonus[:, None]], dim=1).tolist()  # the one read-back of the step
                emitted, committed = [], []
                for b, row in enumerate(host):
                    length, path, extra = row[0], row[1:-1], row[-1]
                    committed.append(path[1:length] + [extra])  # accepted drafts + bonus: new for the drafter
                    if finished[b]:
                        emitted.append([])
                        continue
                    stats.record(length - 1)
                    emitted.append(self._emit(generated[b], committed[b], max_new_tokens))
                    finished[b] = self._ends(generated[b], max_new_tokens)
                stats.steps += 1
                pending, pending_valid = _right_aligned(committed, device)
                root = bonus
                if callback:
                    callback(emitted)
                timings["draft_s"] += t1 - t0
                timings["verify_s"] += t2 - t1
                timings["bookkeeping_s"] += time.perf_counter() - t2
        timings["total_s"] = time.perf_counter() - start
        return GenerateOutput(self._sequences(input_ids, generated), stats.summary(timings, self.tree))

    def _plan(self, device) -> "_TreePlan":
        if self._tree_plan is None or self._tree_plan.tree_mask.device != device:
            self._tree_plan = _TreePlan.build(self.tree, device)
        return self._tree_plan

    def _draft_tree(self, drafter: ModelRunner, pending, pending_valid, root, aligned) -> torch.Tensor:
        """Feed the committed tokens the drafter has not seen, then draft the tree level by level.
        Returns tokens[B, N] (node 0 = root). The drafter's cache ends holding committed tokens only."""
        batch, k = pending.shape
        device = pending.device
        plan = self._plan(device)
        causal = torch.ones(k, k, dtype=torch.bool, device=device).tril()
        positions = drafter.next_positions()[:, None] + (pending_valid.long().cumsum(-1) - 1).clamp(min=0)
        logits, hidden = drafter.forward(pending, causal[None] & pending_valid[:, None, :], positions,
                                         token_valid=pending_valid, hidden=aligned)
        committed = drafter.length
        root_pos = drafter.next_positions() - 1
        tokens = torch.empty(batch, plan.nodes, dtype=torch.long, device=device)
        tokens[:, 0] = root
        level_logits = [self._draft_logits(logits[:, -1:], hidden[:, -1:] if aligned else None)]
        for depth in range(1, self.tree.depth + 1):
            nodes = plan.level_nodes[depth]
            parent_logits = level_logits[depth - 1][:, plan.parent_slot[depth]]
            top = parent_logits.topk(plan.level_top_k[depth], dim=-1).indices
            tokens[:, nodes] = top.gather(-1, plan.ranks[nodes].view(1, -1, 1).expand(batch, -1, 1))[..., 0]
            if depth == self.tree.depth:
                break
            # Levels are appended in node order, so the tree slots so far hold nodes 1 .. nodes[0] - 1.
            width = len(nodes)
            past = torch.cat([drafter.valid[:, None, :committed].expand(batch, width, committed),
                              plan.ancestors[nodes][:, 1:int(nodes[0])][None].expand(batch, -1, -1)], dim=-1)
            siblings_hidden = torch.zeros(batch, width, width, dtype=torch.bool, device=device)
            logits, hidden = drafter.forward(tokens[:, nodes], siblings_hidden, (root_pos + depth)[:, None].expand(-1, width),
                                             past_mask=past, hidden=aligned)
            level_logits.append(self._draft_logits(logits, hidden))
        drafter.crop(committed)
        return tokens

    def _verify(self, verifier: ModelRunner, tokens: torch.Tensor):
        batch = tokens.shape[0]
        plan = self._plan(tokens.device)
        tree_start = verifier.length
        positions = verifier.next_positions()[:, None] + plan.depths[None, :]
        logits, _ = verifier.forward(tokens, plan.tree_mask[None].expand(batch, -1, -1), positions)
        parents = plan.parents.expand(batch, -1)
        if self.mode == "sample":
            uniform = torch.rand(tokens.shape, generator=self._generator, device=tokens.device)
            accept_nodes, accept_len, bonus = ops.verify_tree_sampling(
                tokens, parents, warped_probs(logits, **self._sampling), uniform, max_depth=self.tree.depth)
        else:
            accept_nodes, accept_len, bonus = ops.verify_tree_greedy(tokens, parents, logits.argmax(-1),
                                                                     max_depth=self.tree.depth)
        verifier.keep_accepted(accept_nodes, accept_len, tree_start, int(accept_len.max()))
        return accept_nodes, accept_len, bonus

    def _first_token(self, logits: torch.Tensor) -> torch.Tensor:
        if self.mode == "sample":
            return torch.multinomial(warped_probs(logits, **self._sampling), 1, generator=self._generator)[:, 0]
        return logits.argmax(-1)

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

    def record(self, accepted_drafts: int):
        self.row_steps += 1
        self.accepted += accepted_drafts
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
            "timings": timings,
        }
