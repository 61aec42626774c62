"""Drafter: proposes each step's token tree, and keeps the K/V of what the verifier accepted.

Scoring. Plain: the drafter's own LM head (after its final norm when it drafts from its first k layers),
lifted into the verifier's ids by a VocabMap when the vocabularies differ. Aligned: drafter state ->
BottleneckAdapter -> the verifier's LM head rows (all, or the adapter's reduced draft vocabulary); the
drafter's own head is never computed.

Trees. Static trees (chains, Medusa / EAGLE-1 choices) run one drafter forward per level, over the level's
nodes that have children (leaves are never run), with the plan's masks. Dynamic trees (EAGLE-2) run `top_k`
frontier nodes per level and keep the best `total_tokens` candidates by cumulative log-probability. Every
forward has a fixed width. A context adapter reads the verifier's state at the last accepted node for the
root, and each node's parent's adapted state (its prediction of that state) below it.

Context lookup (TreeSpec.lookup / lookup_top, sdalign_rt/lookup.py): tokens copied from what followed an earlier
occurrence of the text's last tokens, as a chain of extra nodes the drafter never runs, or in place of the
drafter's top path (before the drafter runs those nodes, so their states and children are the proposals').

Cache. The drafter's tree region starts at its committed length: static node i sits at offset i, a dynamic
frontier node at 1 + (level - 1) * top_k + j. After verification `accept` moves the accepted nodes' K/V
down (kv_compact) so the next step reads nothing twice. Only the deepest accepted node can lack K/V (leaves
are never run); the next step's first forward then recomputes it in place, else writes that column to the
scratch slot. When the drafter is the verifier's own first k layers (self-speculative), it reads and writes
the verifier's cache (LayerSkip's shared cache): the verify forward leaves those layers' K/V of every
accepted token in place, so there is no drafter prefill and nothing to recompute.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sdalign_rt import cpu_linear
from sdalign_rt.adapter import BottleneckAdapter
from sdalign_rt.model_runner import ModelRunner
from sdalign_rt.shallow import final_norm
from sdalign_rt.kv_cache import additive
from sdalign_rt.lookup import ContextLookup
from sdalign_rt.tree_plan import TreePlan
from sdalign_rt.trees import LOOKUP_RANK, TreeSpec, ancestor_closure, select_dynamic_tree
from sdalign_rt.vocab import VocabMap

# The top path takes the lookup's proposals only where the text's last tokens matched at least this long: there
# the copy is right more often than the drafter (offline on the frozen evaluation set's greedy answers, every
# position a root: the first draft is right 0.481 with 2+, 0.442 with 1+, 0.346 the drafter alone;
# bench/lookup_offline.py, bench/results/lookup_offline_cpu.json).
LOOKUP_TOP_MIN_MATCH = 2


@dataclass
class Draft:
    """One step's tree. Tensors with a leading 1 are the static plan's, shared by every row."""
    tokens: torch.Tensor  # [B, N] verifier ids, node 0 = the root (the last committed token)
    parents: torch.Tensor  # [B or 1, N]
    block: torch.Tensor  # [B or 1, N, N] additive: self and ancestors
    depths: torch.Tensor  # [B or 1, N]
    ranks: torch.Tensor  # [B or 1, N] rank among the parent's drafted children (0: the top token), -1 at the root
    drafter_offsets: torch.Tensor  # [B or 1, N] node's offset in the drafter's tree region, -1 if never run
    node_states: torch.Tensor | None = None  # [B, N, D] what each run node's drafts were scored from (feature mode)
    layer_states: torch.Tensor | None = None  # [B, N, D] shallow drafter's raw layer-k state of each run node (zeros
    #                                           at leaves): the verify forward starts those nodes at layer k


@dataclass
class DrafterState:
    """The drafter's side of a DecodeStep: its runner and static buffers, written in place every step."""
    runner: ModelRunner | None  # the drafter's runner, over its own cache or the verifier's (None: no drafter)
    previous: torch.Tensor  # [B] int64 drafter id of the last accepted token (own cache only)
    previous_cached: torch.Tensor  # [B] bool: its K/V are already in the drafter's cache
    context: torch.Tensor  # [B, D_verifier] the verifier's state before the root (context adapters)
    lookup: ContextLookup | None = None  # the rows' texts, for a tree with a context-lookup chain


class Drafter:
    def __init__(self, draft, target, tree: TreeSpec, adapter: BottleneckAdapter | None = None,
                 vocab_map: VocabMap | None = None, draft_layers: int | None = None, keep_states: bool = False,
                 keep_layer_states: bool = False):
        self.model, self.target, self.tree = draft, target, tree
        self.adapter, self.vocab_map, self.draft_layers = adapter, vocab_map, draft_layers
        self.keep_states = keep_states
        self.keep_layer_states = keep_layer_states  # layer reuse: static trees on the verifier's own layers
        # Self-speculative: the drafter's layers are the verifier's first k, so their K/V are the verifier's.
        # No drafter at all (plain decoding): nothing of its own either.
        self.shares_verifier_cache = draft is None or (draft is target and draft_layers is not None
                                                       and vocab_map is None)
        self._device_tables: dict = {}

    @property
    def tree_region(self) -> int:
        """Slots one step's drafting writes past the committed length."""
        if self.tree.is_static:
            return self.tree.num_nodes
        return max(self.tree.num_nodes, 1 + (self.tree.depth - 1) * self.tree.top_k)

    # ---- scoring -------------------------------------------------------------------------------------------

    def _tables(self, device):
        """Per device, built once: the aligned head rows, the reduced vocabulary, the vocabulary lift."""
        tables = self._device_tables.get(device)
        if tables is None:
            tables = {}
            if self.adapter is not None:
                head = self.target.get_output_embeddings()
                rows = self.adapter.draft_vocab
                bias = getattr(head, "bias", None)
                tables["head"] = self.adapter.draft_head(head.weight).to(device)
                tables["head_bias"] = None if bias is None else (bias if rows is None else bias[rows.to(bias.device)]
                                                                 ).to(device)
                tables["ids"] = None if rows is None else rows.to(device)
            elif self.vocab_map is not None:
                # Over the drafter's head rows (which may pad its vocabulary): ids the verifier lacks, or rows
                # past the map, can never be drafted.
                rows = self.model.get_output_embeddings().weight.shape[0]
                to_target = torch.full((rows,), -1, dtype=torch.long, device=device)
                known = min(rows, len(self.vocab_map.to_target))
                to_target[:known] = self.vocab_map.to_target[:known].to(device)
                tables["ids"] = to_target.clamp(min=0)
                tables["unmapped"] = torch.where(to_target < 0, float("-inf"), 0.0)
            else:
                tables["ids"] = None
            if self.vocab_map is not None:
                tables["to_draft"] = self.vocab_map.to_draft.to(device)
                tables["unknown"] = self.vocab_map.unknown_id
            self._device_tables[device] = tables
        return tables

    def draft_ids(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Verifier token ids as the drafter reads them."""
        if self.vocab_map is None:
            return target_ids
        tables = self._tables(target_ids.device)
        mapped = tables["to_draft"][target_ids]
        return torch.where(mapped >= 0, mapped, tables["unknown"])

    @property
    def reads_context(self) -> bool:
        """The adapter reads the verifier's state at the position before the one it drafts from."""
        return self.adapter is not None and self.adapter.context_size is not None

    def states(self, hidden: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """What the drafts are scored from: adapter(hidden[, context]) when aligned (in the verifier's hidden
        space), the drafter's hidden state itself when plain. context [..., D_verifier]: the verifier's state
        at the previous position (or the adapter's prediction of it, deeper in the tree)."""
        if self.adapter is None:
            return hidden
        if not self.reads_context:
            return self.adapter(hidden)
        return self.adapter(hidden, context.to(hidden.device))  # the verifier may sit on another device

    def scores(self, states: torch.Tensor) -> torch.Tensor:
        """Draft scores [..., V'] of `states` (V': the draft vocabulary; see `token_ids`)."""
        tables = self._tables(states.device)
        if self.adapter is not None:
            return cpu_linear.linear(states.to(tables["head"].dtype), tables["head"], tables["head_bias"])
        if self.draft_layers is not None:
            states = final_norm(self.model)(states)
        logits = cpu_linear.project(self.model.get_output_embeddings(), states)
        if "unmapped" in tables:
            logits = logits.float() + tables["unmapped"]
        return logits

    def token_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Verifier token ids of indices into the draft scores."""
        ids = self._tables(indices.device)["ids"]
        return indices if ids is None else ids[indices]

    # ---- a generate call -----------------------------------------------------------------------------------

    def new_state(self, runner: ModelRunner | None, context: torch.Tensor) -> DrafterState:
        """The drafter's buffers for one DecodeStep (context [B, D_verifier] is the step's own buffer)."""
        batch = context.shape[0]
        device = runner.cache.device if runner is not None else context.device
        return DrafterState(runner, torch.zeros(batch, dtype=torch.long, device=device),
                            torch.ones(batch, dtype=torch.bool, device=device), context)

    def prepare(self, state: DrafterState) -> None:
        """Build every table a step reads (per device and dtype), so that no step does lazy setup: a CUDA graph
        records only what runs in it, and threads sharing the drafter never race to build one."""
        if self.model is None:
            return
        device, dtype = state.runner.cache.device, state.runner.cache.dtype
        self._tables(device)
        self._tables(state.context.device)
        if self.shares_verifier_cache:
            self._block_root(dtype, 1)
        else:
            self._block_root(dtype, 2)
            self._pair_offsets(device)
        if not self.tree.is_static:
            self._dynamic_tables(device)

    def begin(self, state: DrafterState, draft_input_ids: torch.Tensor | None = None,
              draft_attention_mask: torch.Tensor | None = None, media: dict | None = None) -> None:
        """Prefill the drafter's own cache with its prompt (nothing to do when it shares the verifier's)."""
        if not self.shares_verifier_cache:
            state.runner.prefill(draft_input_ids, draft_attention_mask, media, last_only=True)
            # The last prompt token is cached; the first step's forward writes its column to the scratch slot.
            state.previous.copy_(draft_input_ids[:, -1])
            state.previous_cached.fill_(True)

    def draft(self, state: DrafterState, root: torch.Tensor, plan: TreePlan | None) -> Draft:
        """This step's tree for roots [B] (verifier ids)."""
        if self.model is None:  # plain decoding: the root alone, or the root and the context lookup's chain
            tokens = root[:, None]
            if state.lookup is not None:
                tokens = torch.cat([tokens, state.lookup.propose()[0]], dim=1)
            return Draft(tokens, plan.parents, plan.block, plan.depths, plan.ranks, plan.drafter_offsets)
        root_hidden = self.root_forward(state, root)
        root_states = self.states(root_hidden, state.context)
        if self.tree.is_static:
            return self._draft_static(state, root, root_hidden, root_states, plan)
        return self._draft_dynamic(state, root, root_states)

    def root_forward(self, state: DrafterState, root: torch.Tensor) -> torch.Tensor:
        """The root (and, with its own cache, the previous accepted token) through the drafter: [B, D]."""
        runner = state.runner
        cache = runner.cache
        length = cache.lengths
        if self.shares_verifier_cache:  # no vocabulary map: the root's id is the drafter's
            tokens, slots = root[:, None], length[:, None]
            positions = cache.next_positions()[:, None]
            block, offset = self._block_root(cache.dtype, 1), length
        else:
            # [previous, root] at slots [length - 1, length]; a cached previous writes to the scratch slot.
            tokens = torch.stack([state.previous, self.draft_ids(root).to(state.previous.device)], dim=1)
            previous_slot = torch.where(state.previous_cached, cache.scratch_slot, length - 1)
            slots = torch.stack([previous_slot, length], dim=1)
            positions = cache.next_positions()[:, None] + self._pair_offsets(root.device)
            block, offset = self._block_root(cache.dtype, 2), length - 1
        hidden = runner.forward(runner.embed(tokens), positions, slots, cache.mask(block, offset))
        return hidden[:, -1]

    def _pair_offsets(self, device):
        key = ("pair", device)
        if key not in self._device_tables:
            self._device_tables[key] = torch.tensor([[-1, 0]], device=device)
        return self._device_tables[key]

    def _block_root(self, dtype, width: int) -> torch.Tensor:
        """Level 0's block: the root sees itself; with [previous, root], both see the previous token's column."""
        key = ("root", width, dtype)
        if key not in self._device_tables:
            device = self._root_device()
            visible = torch.ones(1, width, width, dtype=torch.bool, device=device).tril()
            self._device_tables[key] = additive(visible, dtype)
        return self._device_tables[key]

    def _root_device(self):
        return self.model.get_input_embeddings().weight.device

    def level_forward(self, state: DrafterState, tokens, depth: int, offsets, block) -> torch.Tensor:
        """Drafter forward of tree nodes: tokens [B, W] at tree offsets [1 or B, W], all at depth `depth`,
        seeing the committed slots plus block [1 or B, W, R] over the tree region's first R offsets."""
        runner = state.runner
        cache = runner.cache
        length = cache.lengths
        tokens = self.draft_ids(tokens).to(cache.device)  # the tree is built on the verifier's side
        slots = length[:, None] + offsets.to(cache.device)
        positions = (cache.next_positions() + depth)[:, None].expand(tokens.shape)
        return runner.forward(runner.embed(tokens), positions, slots.expand(tokens.shape),
                              cache.mask(block.to(cache.device), length))

    def _draft_static(self, state, root, root_hidden, root_states, plan: TreePlan) -> Draft:
        batch = root.shape[0]
        tokens = torch.empty(batch, plan.nodes, dtype=torch.long, device=root.device)
        tokens[:, 0] = root
        node_states = layer_states = None
        if self.keep_states:
            node_states = root_states.new_zeros(batch, plan.nodes, root_states.shape[-1])
            node_states[:, 0] = root_states
        if self.keep_layer_states:
            layer_states = root_hidden.new_zeros(batch, plan.nodes, root_hidden.shape[-1])
            layer_states[:, 0] = root_hidden
        ranks, proposals, found = plan.ranks, None, None
        if state.lookup is not None:  # the context-lookup chain (no drafter forward) and the top path's lookup
            proposals, matched = state.lookup.propose()
            first, end = plan.lookup
            tokens[:, first:end] = proposals[:, : end - first]
            if self.tree.lookup_top:
                found = matched >= LOOKUP_TOP_MIN_MATCH
                ranks = plan.ranks.expand(batch, -1).clone()
        level_states = root_states[:, None]  # [B, w, D] of the previous level's expanded nodes
        level_scores = self.scores(level_states) if plan.draft_depth else None
        for depth in range(1, plan.draft_depth + 1):
            start, end = plan.levels[depth]
            top = level_scores.topk(plan.children_needed[depth], dim=-1).indices  # [B, w, k]
            picked = top[:, plan.parent_in_level[depth], plan.ranks[0, start:end]]  # [B, n_d]
            tokens[:, start:end] = self.token_ids(picked)
            if depth <= self.tree.lookup_top and found is not None:
                # The top path's node at this depth (the level's first: choices sort (0,) * depth first) takes the
                # lookup's proposal before the drafter runs it, so its states are the proposal's.
                tokens[:, start] = torch.where(found, proposals[:, depth - 1], tokens[:, start])
                ranks[:, start] = torch.where(found, LOOKUP_RANK, ranks[:, start])
            if depth == plan.draft_depth:
                break
            run = plan.expanded[depth]  # the level's nodes with children; the others are leaves
            hidden = self.level_forward(state, tokens[:, run], depth, run[None], plan.block[:, run, :end])
            if layer_states is not None:
                layer_states[:, run] = hidden
            # A node's context is its parent's predicted verifier state: the true one is not known yet.
            parents_in_above = plan.parent_in_level[depth][run - start]
            level_states = self.states(hidden, level_states[:, parents_in_above])
            level_scores = self.scores(level_states)
            if node_states is not None:
                node_states[:, run] = level_states
        return Draft(tokens, plan.parents, plan.block, plan.depths, ranks, plan.drafter_offsets, node_states,
                     layer_states)

    def _draft_dynamic(self, state, root, root_states) -> Draft:
        """EAGLE-2 with fixed widths: per level the top_k candidates of the newest level by cumulative draft
        log-prob run through the drafter and each proposes top_k children; select_dynamic_tree keeps the best
        total_tokens candidates as the tree."""
        k, depth = self.tree.top_k, self.tree.depth
        batch, device = root.shape[0], root.device
        region = 1 + (depth - 1) * k  # drafter tree-region offsets: the root, then k per forwarded level
        count = k + (depth - 1) * k * k  # candidates
        width = root_states.shape[-1]
        logp, top = self.scores(root_states).float().log_softmax(-1).topk(k, dim=-1)
        cand_tokens = torch.zeros(batch, count, dtype=torch.long, device=device)
        cand_scores = torch.full((batch, count), float("-inf"), device=device)
        cand_parents = torch.full((batch, count), -1, dtype=torch.long, device=device)
        cand_ranks = torch.zeros(batch, count, dtype=torch.long, device=device)
        cand_offsets = torch.full((batch, count), -1, dtype=torch.long, device=device)
        # Which tree-region offsets each candidate sees: the root's and its forwarded ancestors'.
        cand_sees = torch.zeros(batch, count, region, dtype=torch.bool, device=device)
        cand_sees[:, :, 0].fill_(True)
        # Each candidate's parent's states: its context, and (once it runs) what it is scored from.
        cand_context = root_states.new_zeros(batch, count, width)
        cand_states = root_states.new_zeros(batch, count, width) if self.keep_states else None
        tables = self._dynamic_tables(device)
        cand_tokens[:, :k] = self.token_ids(top)
        cand_scores[:, :k] = logp
        cand_ranks[:, :k] = tables["ranks"][None, :k]
        cand_context[:, :k] = root_states[:, None]
        level_start, level_end = 0, k
        for level in range(1, depth):
            chosen = level_start + cand_scores[:, level_start:level_end].topk(k, dim=-1).indices  # [B, k]
            offsets = 1 + (level - 1) * k + tables["ranks"][None, :k]  # [1, k]
            cand_offsets.scatter_(1, chosen, offsets.expand(batch, k))
            sees = cand_sees.gather(1, chosen[..., None].expand(-1, -1, region))
            sees = sees | tables["own_offset"][level - 1][None]  # [B, k, region]: + itself
            hidden = self.level_forward(state, cand_tokens.gather(1, chosen), level, offsets,
                                         additive(sees, state.runner.cache.dtype))
            states = self.states(hidden, cand_context.gather(1, chosen[..., None].expand(-1, -1, width)))
            if cand_states is not None:
                cand_states.scatter_(1, chosen[..., None].expand(-1, -1, width), states)
            child_logp, child_top = self.scores(states).float().log_softmax(-1).topk(k, dim=-1)  # [B, k, k]
            new_start, new_end = level_end, level_end + k * k
            cand_tokens[:, new_start:new_end] = self.token_ids(child_top).reshape(batch, k * k)
            cand_scores[:, new_start:new_end] = (cand_scores.gather(1, chosen)[..., None] + child_logp).reshape(
                batch, k * k)
            cand_parents[:, new_start:new_end] = chosen[..., None].expand(-1, -1, k).reshape(batch, k * k)
            cand_ranks[:, new_start:new_end] = tables["ranks"][None, :k].repeat(1, k)
            cand_sees[:, new_start:new_end] = sees[:, :, None].expand(-1, -1, k, -1).reshape(batch, k * k, region)
            cand_context[:, new_start:new_end] = states[:, :, None].expand(-1, -1, k, -1).reshape(batch, k * k, width)
            level_start, level_end = new_start, new_end
        parents, tokens, kept = select_dynamic_tree(cand_parents, cand_tokens, cand_scores, self.tree.total_tokens)
        tokens[:, 0] = root
        visible, depths = ancestor_closure(parents)
        root_column = torch.zeros(batch, 1, dtype=torch.long, device=device)
        drafter_offsets = torch.cat([root_column, cand_offsets.gather(1, kept)], dim=1)
        ranks = torch.cat([root_column - 1, cand_ranks.gather(1, kept)], dim=1)
        node_states = None
        if cand_states is not None:  # never-run candidates (leaves) keep zeros: they are nobody's parent
            node_states = torch.cat([root_states[:, None], cand_states.gather(1, kept[..., None].expand(-1, -1, width))],
                                    dim=1)
        return Draft(tokens, parents, additive(visible, state.runner.cache.dtype), depths, ranks, drafter_offsets,
                     node_states)

    def _dynamic_tables(self, device):
        key = ("dynamic", device)
        if key not in self._device_tables:
            k, depth = self.tree.top_k, self.tree.depth
            region = 1 + (depth - 1) * k
            ranks = torch.arange(k, device=device)
            own = torch.zeros(max(depth - 1, 1), k, region, dtype=torch.bool, device=device)
            for level in range(1, depth):
                own[level - 1, ranks, 1 + (level - 1) * k + ranks] = True
            self._device_tables[key] = {"ranks": ranks, "own_offset": own}
        return self._device_tables[key]

    # ---- after verification --------------------------------------------------------------------------------

    def accept(self, state: DrafterState, draft: Draft, accept_nodes: torch.Tensor, accept_len: torch.Tensor,
               grow: torch.Tensor) -> None:
        """Keep the accepted nodes' K/V (accept_nodes [B, M] root first, -1 padded; accept_len [B]); grow [B]
        is accept_len for live rows and 0 for finished ones. Shared caches are compacted by the verifier."""
        if self.shares_verifier_cache:
            return
        cache = state.runner.cache
        device = cache.device  # the verifier's outputs may sit on another device than the drafter
        accept_nodes, accept_len, grow = accept_nodes.to(device), accept_len.to(device), grow.to(device)
        batch = accept_nodes.shape[0]
        valid = accept_nodes >= 0
        offsets = draft.drafter_offsets.to(device).expand(batch, -1).gather(1, accept_nodes.clamp(min=0))
        offsets = torch.where(valid, offsets, -1)
        cache.compact(offsets, cache.lengths)
        last = (accept_len - 1).clamp(min=0)[:, None]
        last_offset = offsets.gather(1, last)[:, 0]
        last_token = draft.tokens.to(device).gather(1, accept_nodes.gather(1, last).clamp(min=0))[:, 0]
        frozen = grow == 0
        state.previous.copy_(torch.where(frozen, state.previous, self.draft_ids(last_token)))
        state.previous_cached.copy_(frozen | (last_offset >= 0))
        cache.lengths += grow
        cache.refresh_bias()
