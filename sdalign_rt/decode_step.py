"""DecodeStep: one speculative decoding step over static buffers, the unit a CUDA graph captures whole.

    step = decoder.session(...)     # a DecodeStep, built once per (workspace, tree plan, sampling warp)
    first = step.prefill(...)       # caches filled, roots and context set; host rows [first token, non-finite]
    rows = step.step(generator)     # draft -> verify -> accept -> commit on the device, then the one read-back

The device side of a step (`run`: draft, verify_forward, accept, commit) reads and writes only tensors that
live as long as the step object: the two caches (K/V, lengths, bias), the tree plan, the drafter's tables and
the buffers below. It makes no host sync and allocates nothing that outlives it, so on CUDA it is recorded
once as a CUDA graph (after a warm-up that runs every lazy setup, its effects undone) and replayed each step,
as SGLang's and vLLM's graph runners replay draft and verify. The read-back is the only host sync: a
non-blocking copy into pinned host memory and an event.

Buffers (allocated in __init__, written in place by every step; B rows, N tree nodes, D_v verifier width):

    roots     [B] int64            node 0 of the next tree: the last committed token (the bonus of the last step)
    live      [B] int64            1 while a row decodes; 0 freezes it (its lengths stop growing)
    context   [B, D_v]             the verifier's final state at the last committed token (context adapters)
    uniforms  [B, N] fp32          sample mode's draws, filled outside the device side (and outside a graph)
    readback  [B, 4 + 2 * (depth + 1)] int64: accept_len, feature mismatches, non-finite flag,
              path tokens [depth + 1], path ranks [depth + 1], bonus
    host      readback's pinned host copy (a plain CPU tensor when the step runs on the CPU)

and the drafter's (previous token, whether it is cached) when it keeps its own cache, and, for a tree with a
context-lookup chain, the rows' texts (sdalign_rt/lookup.py: set at prefill, extended by every commit).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch

from sdalign_rt import ops
from sdalign_rt.drafter import Draft, Drafter
from sdalign_rt.lookup import ContextLookup
from sdalign_rt.sampling import warped_probs
from sdalign_rt.tree_plan import TreePlan
from sdalign_rt.trees import TreeSpec
from sdalign_rt.workspace import Workspace


class Mode(str, Enum):
    GREEDY = "greedy"  # lossless: token-identical to the verifier's greedy decoding
    SAMPLE = "sample"  # lossless in distribution
    FEATURE = "feature"  # relaxed and lossy: cosine of drafter and verifier states


MODES = tuple(mode.value for mode in Mode)


@dataclass(frozen=True)
class Sampling:
    """The decoding rule's distribution: sample mode's warp (temperature, top-k, top-p as HF applies them),
    fixed per step object because a captured graph bakes it in."""
    mode: Mode
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def warp(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}

    def first_token(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.mode is Mode.SAMPLE:
            return torch.multinomial(warped_probs(logits, **self.warp), 1, generator=generator)[:, 0]
        return logits.argmax(-1)


@dataclass
class Outcome:
    """What verification decided, per row (tensors of the step, on the verifier's bookkeeping device)."""
    accept_nodes: torch.Tensor  # [B, depth + 1] int64 root first, -1 padded
    accept_len: torch.Tensor  # [B] int64 accepted nodes, root included (= tokens the step emits)
    bonus: torch.Tensor  # [B] int64 the verifier's token after the accepted path
    mismatches: torch.Tensor  # [B] int64 feature mode: accepted drafts that differ from the verifier's argmax
    nonfinite: torch.Tensor  # [B] bool: a node's logits hold nan / inf
    context: torch.Tensor  # [B, D_v] the verifier's final state at the last accepted node


class DecodeStep:
    """One decode step of a SpeculativeDecoder over a held Workspace (see the module docstring).

    Parameters
    ----------
    drafter : Drafter, the decoder's (shared by every step object; its tables are built here).
    workspace : Workspace, the caches and runners this step reads and writes.
    tree : TreeSpec; plan : TreePlan of a static tree for this batch, device and dtype (None for dynamic trees).
    sampling : Sampling; feature_threshold : float (feature mode).
    graphs : capture the device side as a CUDA graph (CUDA only; a failed capture warns and runs eagerly).

    Layer reuse (LayerSkip's): when the drafter is the verifier's own first k layers and the tree is static, the
    verify forward runs layers < k for the leaves alone (the drafter never ran them) and starts every node at layer
    k from the state the drafter computed for exactly that token at that position (Draft.layer_states).
    """

    def __init__(self, drafter: Drafter, workspace: Workspace, tree: TreeSpec, plan: TreePlan | None,
                 sampling: Sampling, feature_threshold: float = 0.9, graphs: bool = False):
        # Layer reuse: a static tree drafted by the verifier's own first k layers (lean forwards) left layers < k
        # of every node it ran in the shared cache, at the slots the verify forward uses (node i at length + i).
        self.reuse_layers = drafter.keep_layer_states and plan is not None
        self.drafter, self.workspace, self.tree, self.plan = drafter, workspace, tree, plan
        self.sampling, self.mode, self.feature_threshold = sampling, sampling.mode, feature_threshold
        verifier = workspace.verifier
        cache = verifier.cache
        batch, device = workspace.batch, cache.device
        hidden = verifier.model.get_output_embeddings().weight.shape[1]
        self.roots = torch.zeros(batch, dtype=torch.long, device=device)
        self.live = torch.ones(batch, dtype=torch.long, device=device)
        self.context = torch.zeros(batch, hidden, dtype=cache.dtype, device=device)
        self.uniforms = torch.zeros(batch, tree.num_nodes, dtype=torch.float32, device=device)
        self.readback = torch.zeros(batch, 4 + 2 * (tree.depth + 1), dtype=torch.long, device=device)
        cuda = device.type == "cuda"
        self.host = torch.zeros(self.readback.shape, dtype=torch.long, pin_memory=cuda) if cuda else self.readback
        self._copied = torch.cuda.Event() if cuda else None
        self.drafter_state = drafter.new_state(workspace.drafter, self.context)
        if tree.lookup or tree.lookup_top:  # the texts the lookup reads: as long as the verifier's cache can grow
            self.drafter_state.lookup = ContextLookup(batch, cache.capacity, max(tree.lookup, tree.lookup_top),
                                                      device)
            self._path_columns = torch.arange(tree.depth + 1, device=device)  # where each row's bonus lands
        drafter.prepare(self.drafter_state)
        # One graph records one device's stream: a model spread over GPUs (or a drafter on another GPU) steps eagerly.
        devices = {buffer.device for runner in (verifier, workspace.drafter) if runner is not None
                   for buffer in runner.cache.buffers} | {device}
        self.graphs = bool(graphs) and cuda and len(devices) == 1
        self.graph: torch.cuda.CUDAGraph | None = None
        self._capture_failed = False

    @property
    def verifier(self):
        return self.workspace.verifier

    # ---- per call ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_inputs: dict | None = None,
                draft_input_ids: torch.Tensor | None = None, draft_attention_mask: torch.Tensor | None = None,
                draft_inputs: dict | None = None, generator: torch.Generator | None = None) -> list[list[int]]:
        """Fill both caches with the prompts (left-padded [B, P] ids and masks) and set the roots and context.
        Returns per row [first token, non-finite flag] (the prefill's one host read)."""
        last = self.verifier.prefill(input_ids, attention_mask, target_inputs)
        logits = self.verifier.logits(last)
        self.drafter.begin(self.drafter_state, draft_input_ids, draft_attention_mask, draft_inputs)
        self.context.copy_(last)  # the verifier's state at the last prompt token
        root = self.sampling.first_token(logits, generator)
        self.roots.copy_(root)
        self.live.fill_(1)
        if self.drafter_state.lookup is not None:
            self.drafter_state.lookup.start(input_ids, attention_mask, root)
        nonfinite = _nonfinite(logits[:, None], logits.argmax(-1)[:, None])
        return torch.stack([root, nonfinite.long()], dim=1).tolist()

    def set_live(self, live: list[int]) -> None:
        """Which rows still decode (host -> device, after a row finished): finished rows stop growing."""
        self.live.copy_(torch.tensor(live, dtype=torch.long))

    # ---- the device side ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def draft(self) -> Draft:
        """This step's tree from the roots: tokens [B, N], parents, block, depths, ranks, drafter offsets."""
        return self.drafter.draft(self.drafter_state, self.roots, self.plan)

    @torch.no_grad()
    def verify_forward(self, draft: Draft) -> tuple[torch.Tensor, torch.Tensor]:
        """The verifier's ONE forward over the tree at its cache's tree region: (hidden [B, N, D_v], logits
        [B, N, V]). Node i is written at slot length + i."""
        verifier = self.verifier
        cache = verifier.cache
        slots = cache.lengths[:, None] + cache.slot_range(draft.tokens.shape[1])  # [B, N]: node i at length + i
        positions = cache.next_positions()[:, None] + draft.depths  # e.g. length 7, depths [0, 1, 1, 2] -> [7, 8, 8, 9]
        bias = cache.mask(draft.block, cache.lengths)
        if not self.reuse_layers or draft.layer_states is None:
            hidden = verifier.forward(verifier.embed(draft.tokens), positions, slots, bias)
        else:
            k, leaves = self.drafter.draft_layers, self.plan.leaves
            # The leaves' first k layers: they see their ancestors' layer-< k K/V, which the drafter wrote.
            leaf_hidden = verifier.forward(verifier.embed(draft.tokens[:, leaves]), positions[:, leaves],
                                           slots[:, leaves], cache.mask(self.plan.leaf_block, cache.lengths),
                                           layers=(0, k), norm=False)
            layer_k = draft.layer_states.index_copy(1, leaves, leaf_hidden.to(draft.layer_states.dtype))
            hidden = verifier.forward(layer_k, positions, slots, bias, layers=(k, verifier.num_layers))
        return hidden, verifier.logits(hidden)  # every node is checked

    @torch.no_grad()
    def accept(self, draft: Draft, hidden: torch.Tensor, logits: torch.Tensor) -> Outcome:
        """The acceptance rule on the verifier's output: each row's accepted path and bonus token."""
        tokens = draft.tokens
        parents = draft.parents.expand(tokens.shape)
        argmax = logits.argmax(-1)
        depth = self.tree.depth
        if self.mode is Mode.SAMPLE:
            accept_nodes, accept_len, bonus = ops.verify_tree_sampling(
                tokens, parents, warped_probs(logits, **self.sampling.warp), self.uniforms, max_depth=depth)
        elif self.mode is Mode.FEATURE:
            states = draft.node_states.to(hidden.device)  # kept from drafting: the adapter never runs twice
            _, close, _ = ops.cosine_accept(states, hidden.to(states.dtype), self.feature_threshold, "relaxed")
            accept_nodes, accept_len = feature_path(close, parents, draft.ranks, depth)
            last = accept_nodes.gather(1, (accept_len - 1)[:, None])
            bonus = argmax.gather(1, last)[:, 0]
        else:
            accept_nodes, accept_len, bonus = ops.verify_tree_greedy(tokens, parents, argmax, max_depth=depth)
        if self.mode is Mode.FEATURE:  # accepted drafts that differ from the verifier's own argmax
            path = accept_nodes[:, 1:]
            differs = tokens.gather(1, path.clamp(min=0)) != argmax.gather(1, accept_nodes[:, :-1].clamp(min=0))
            mismatches = (differs & (path >= 0)).sum(-1)
        else:
            mismatches = torch.zeros_like(accept_len)
        last = accept_nodes.gather(1, (accept_len - 1)[:, None])
        # The verifier's state at the last accepted node: the next root's context (context-reading adapters).
        context = hidden.gather(1, last[..., None].expand(-1, -1, hidden.shape[-1]))[:, 0]
        return Outcome(accept_nodes, accept_len, bonus, mismatches, _nonfinite(logits, argmax), context)

    @torch.no_grad()
    def commit(self, draft: Draft, outcome: Outcome) -> None:
        """Keep the accepted slots in both caches, advance the lengths of live rows, refresh the biases, set the
        next roots and context, and assemble the read-back on the device. Everything is written in place."""
        cache = self.verifier.cache
        grow = outcome.accept_len * self.live
        cache.compact(outcome.accept_nodes, cache.lengths)
        if not self.drafter.shares_verifier_cache:
            self.drafter.accept(self.drafter_state, draft, outcome.accept_nodes, outcome.accept_len, grow)
        cache.lengths += grow
        cache.refresh_bias()
        self.context.copy_(outcome.context)
        path = outcome.accept_nodes.clamp(min=0)
        width = path.shape[1]
        readback = self.readback
        readback[:, 0] = outcome.accept_len
        readback[:, 1] = outcome.mismatches
        readback[:, 2] = outcome.nonfinite
        readback[:, 3:3 + width] = draft.tokens.gather(1, path)
        # ranks for acceptance by (depth, rank)
        readback[:, 3 + width:3 + 2 * width] = draft.ranks.expand(draft.tokens.shape).gather(1, path)
        readback[:, -1] = outcome.bonus
        lookup = self.drafter_state.lookup
        if lookup is not None:  # the emitted tokens (accepted drafts, then the bonus) extend the rows' texts
            emitted = torch.cat([readback[:, 4:3 + width], outcome.bonus[:, None]], dim=1)
            emitted = torch.where(self._path_columns[None] == (outcome.accept_len - 1)[:, None],
                                  outcome.bonus[:, None], emitted)
            lookup.append(emitted, grow)
        self.roots.copy_(outcome.bonus)  # last: the draft's root column may be a view of the roots

    @torch.no_grad()
    def run(self, timings: dict | None = None) -> None:
        """The device side of one step, eagerly: draft, verify, accept, commit. With `timings`, host-clock seconds
        go to draft_s / verify_forward_s / bookkeeping_s (exact on CPU; launches only on CUDA); a capture passes
        none."""
        start = time.perf_counter()
        draft = self.draft()
        drafted = time.perf_counter()
        hidden, logits = self.verify_forward(draft)
        verified = time.perf_counter()
        self.commit(draft, self.accept(draft, hidden, logits))
        if timings is not None:
            timings["draft_s"] += drafted - start
            timings["verify_forward_s"] += verified - drafted
            timings["bookkeeping_s"] += time.perf_counter() - verified

    def read_back(self) -> list[list[int]]:
        """The step's one host sync: the read-back rows (see the module docstring for the layout)."""
        if self._copied is None:
            return self.readback.tolist()
        self.host.copy_(self.readback, non_blocking=True)
        self._copied.record()
        self._copied.synchronize()
        return self.host.tolist()

    def draw(self, generator: torch.Generator | None) -> None:
        """Sample mode's uniforms for the next step, drawn into their buffer outside the device side."""
        if self.mode is Mode.SAMPLE:
            torch.rand(self.uniforms.shape, generator=generator, device=self.uniforms.device, out=self.uniforms)

    @torch.no_grad()
    def step(self, generator: torch.Generator | None = None, timings: dict | None = None) -> list[list[int]]:
        """One whole step: uniforms, the device side (a graph replay where captured), the read-back. With
        `timings`, eager steps add host-clock seconds to draft_s / verify_forward_s / bookkeeping_s (exact on
        CPU; launches only on CUDA) and graphed steps to step_s."""
        self.draw(generator)
        if self.graphs and self.graph is None and not self._capture_failed:
            self.capture()
        start = time.perf_counter()
        if self.graph is not None:
            self.graph.replay()
            rows = self.read_back()
            if timings is not None:
                timings["step_s"] = timings.get("step_s", 0.0) + time.perf_counter() - start
            return rows
        self.run(timings)
        read = time.perf_counter()
        rows = self.read_back()
        if timings is not None:
            timings["bookkeeping_s"] += time.perf_counter() - read
        return rows

    # ---- CUDA graphs -------------------------------------------------------------------------------------------

    def state_tensors(self) -> list[torch.Tensor]:
        """The small tensors a step changes besides free cache slots: saving and restoring them undoes a step
        (the K/V it wrote sit in slots at or past the lengths, which the restored lengths make free again)."""
        caches = [self.verifier.cache]
        if self.workspace.drafter is not None and not self.workspace.shared:
            caches.append(self.workspace.drafter.cache)
        tensors = [t for cache in caches for t in (cache.lengths, cache.starts, cache.bias)]
        state = self.drafter_state
        lookup = [] if state.lookup is None else state.lookup.buffers
        return tensors + [self.roots, self.live, self.context, self.uniforms, self.readback, state.previous,
                          state.previous_cached] + lookup

    def snapshot(self) -> Callable[[], None]:
        """Save state_tensors() now; the returned function puts them back (undoing the steps run in between)."""
        saved = [t.clone() for t in self.state_tensors()]

        def restore():
            for tensor, value in zip(self.state_tensors(), saved):
                tensor.copy_(value)

        return restore

    @torch.no_grad()
    def capture(self) -> None:
        """Record the device side as one CUDA graph: two warm-up runs on a side stream (Triton compiles, cuBLAS
        workspaces, allocator pools), each undone, then the capture, which runs nothing. Call after prefill.
        A failure (an op that syncs or allocates host memory) warns and leaves the step eager."""
        device = self.roots.device
        restore = self.snapshot()
        try:
            with torch.cuda.device(device):  # the graph records the current device's stream
                stream = torch.cuda.Stream(device=device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self.run()
                        restore()
                torch.cuda.current_stream(device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.run()
            self.graph = graph
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to the eager step
            self._capture_failed = True
            torch.cuda.synchronize(device)
            restore()
            warnings.warn(f"CUDA graph capture of the decode step failed ({type(error).__name__}: {error}); "
                          "the step runs eagerly", stacklevel=2)


def feature_path(close: torch.Tensor, parents: torch.Tensor, ranks: torch.Tensor, max_depth: int):
    """Feature mode's rule: node i is accepted iff its parent is, the parent's states are close (close[B, N]
    bool, per node as a parent) and i is the drafter's top-ranked child there (ranks[B or 1, N] == 0).
    Returns (accept_nodes[B, max_depth + 1], accept_len[B]) as verify_tree_greedy gives them.

    Example: parents [-1, 0, 0, 2], ranks [-1, 0, 1, 0], close everywhere: the path is [0, 1]; node 3 is
    deeper, but it hangs under the root's second choice, which closeness at the root does not vouch for.
    """
    passes = (close.gather(1, parents.clamp(min=0)) & (ranks.expand(parents.shape) == 0)).long()
    # verify_tree_greedy's path rule on the flags: node i is accepted iff passes[i] == 1 and its parent is.
    accept_nodes, accept_len, _ = ops.verify_tree_greedy(passes, parents, torch.ones_like(passes),
                                                         max_depth=max_depth)
    return accept_nodes, accept_len


def _nonfinite(logits: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
    """[B] bool: any node's logits [B, N, V] hold nan or +inf, without a host sync or a second pass over them:
    argmax (already computed) points at a nan or +inf wherever a row holds one (torch's max propagates nan)."""
    return ~torch.isfinite(logits.gather(-1, argmax[..., None])[..., 0]).all(-1)
