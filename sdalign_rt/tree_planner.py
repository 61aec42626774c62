"""Static trees planned from measured costs and calibrated acceptance (the idea of Sequoia; our own code).

Which tree pays depends on the verifier's cost against node count and the drafter's cost per level on the
user's device and dtype, and on how often the verifier takes the drafter's rank-r candidate at depth d. All
three are measured here:

  acceptance  a short greedy decode of calibration prompts with a "comb" tree (ranks 0 .. R-1 at every depth
              along the drafter's top-1 spine) gives q[d][r] = P(the verifier's token at depth d + 1 is the
              drafter's rank-r candidate | the path down to depth d was accepted);
  costs       one verifier forward and its logits per node count 1 .. max_nodes, the drafter's root forward
              and one level forward per width (forward, adapter, scores, top-k), and the bookkeeping around
              them (verification, compaction, the read-back), each timed on the real runners (waiting for the
              GPU on CUDA).

A static tree then emits E = 1 + sum over its draft nodes of the product of q along the node's path tokens per
step (one child at most matches the verifier's token, so sibling events are disjoint), at a cost of root +
sum of its drafted levels + verify(N) + bookkeeping. For every depth limit the best N-node trees are the N
nodes of largest path probability (a prefix-closed set, since probabilities only shrink down a path). That
cost model ranks every tree; its best few (and the one-draft chain) are then timed in real decoding steps on
the calibration prompts, interleaved over rounds, and the plan is the one of highest E / in-loop step time
(the parts timed apart were a third off the loop on a 2-core CPU: the verifier's and the drafter's weights
evict each other from the caches in a real step).
"""
from __future__ import annotations

import heapq
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from sdalign_rt import ops
from sdalign_rt.decoder import SpeculativeDecoder
from sdalign_rt.drafter import Draft
from sdalign_rt.kv_cache import additive
from sdalign_rt.trees import TreeSpec


def comb_tree(depth: int, ranks: int) -> TreeSpec:
    """Ranks 0 .. ranks-1 at each depth, below the rank-0 spine: what calibration decodes with."""
    return TreeSpec.static([(0,) * d + (r,) for d in range(depth) for r in range(ranks)])


@dataclass
class Acceptance:
    q: list  # q[d][r], d = depth - 1
    row_steps: int = 0

    @classmethod
    def from_comb_stats(cls, stats: dict, ranks: int) -> "Acceptance":
        """From a comb-tree decode's stats: accepted drafts by (depth, rank) over the times the spine reached
        the depth above (every step for depth 1; the accepted rank-0 node of the depth above after that)."""
        # A copied draft on the top path (lookup_top) stands where the drafter's rank-0 one would have.
        counts = [[d.get(str(r), 0) + (d.get("lookup", 0) if r == 0 else 0) for r in range(ranks)]
                  for d in stats["accepted_by_depth_rank"]]
        q, reached = [], stats["row_steps"]
        for level in counts:
            q.append([c / reached if reached else 0.0 for c in level])
            reached = level[0]
        return cls(q, stats["row_steps"])

    def path_probability(self, path: tuple) -> float:
        p = 1.0
        for depth, rank in enumerate(path):
            if depth >= len(self.q) or rank >= len(self.q[depth]):
                return 0.0
            p *= self.q[depth][rank]
        return p

    def expected_tokens(self, tree: TreeSpec) -> float:
        return 1.0 + sum(self.path_probability(path) for path in tree.choices)


@dataclass
class StepCosts:
    verify_s: dict  # node count (root included) -> seconds of a verifier forward + logits + verification
    root_s: float  # the drafter's root forward and its scoring
    level_s: dict  # width -> seconds of one drafted level (forward + scoring)
    overhead_s: float  # the rest of a step: compaction, the read-back, emission

    def step_s(self, tree: TreeSpec) -> float:
        drafted = sum(self._level(w) for w in _expanded_widths(tree))
        return self.root_s + drafted + self._verify(tree.num_nodes) + self.overhead_s

    def _verify(self, nodes: int) -> float:
        if nodes in self.verify_s:
            return self.verify_s[nodes]
        return self.verify_s[max(self.verify_s)] * nodes / max(self.verify_s)  # past what was timed: linear

    def _level(self, width: int) -> float:
        if width in self.level_s:
            return self.level_s[width]
        return self.level_s[max(self.level_s)] * width / max(self.level_s)


def _expanded_widths(tree: TreeSpec) -> list:
    """How many nodes of each depth 1 .. depth-1 have children: the widths of the drafter's level forwards."""
    parents = {path[:-1] for path in tree.choices if len(path) > 1}
    return [sum(1 for p in parents if len(p) == d) for d in range(1, tree.depth)]


@dataclass
class PlannedTree:
    tree: TreeSpec
    expected_tokens: float
    step_s: float
    predicted_tokens_per_s: float
    candidates: list = field(default_factory=list)  # (nodes, max_depth, expected, tokens/s) of every tree weighed

    def to_json(self) -> dict:
        return {"tree": str(self.tree), "choices": [list(p) for p in self.tree.choices],
                "nodes": self.tree.num_nodes, "depth": self.tree.depth, "expected_tokens": self.expected_tokens,
                "step_ms": 1e3 * self.step_s, "predicted_tokens_per_s": self.predicted_tokens_per_s,
                "candidates": self.candidates}


def top_paths(acceptance: Acceptance, count: int, max_depth: int) -> list:
    """The `count` rank paths of largest probability, no deeper than max_depth (a prefix-closed set)."""
    ranks = max((len(level) for level in acceptance.q), default=0)
    heap = [(-acceptance.path_probability((r,)), (r,)) for r in range(ranks)]
    heapq.heapify(heap)
    chosen = []
    while heap and len(chosen) < count:
        negative, path = heapq.heappop(heap)
        if -negative <= 0:
            break
        chosen.append(path)
        if len(path) < max_depth:
            for r in range(ranks):
                child = path + (r,)
                heapq.heappush(heap, (-acceptance.path_probability(child), child))
    return chosen


def best_tree(acceptance: Acceptance, costs: StepCosts, max_nodes: int, max_depth: int) -> PlannedTree:
    """The static tree of at most max_nodes nodes (root included) and max_depth levels with the most tokens/s."""
    best, weighed = None, []
    for depth in range(1, max_depth + 1):
        for drafts in range(1, max_nodes):
            paths = top_paths(acceptance, drafts, depth)
            if len(paths) < drafts:
                break
            tree = TreeSpec.static(paths)
            expected, step = acceptance.expected_tokens(tree), costs.step_s(tree)
            weighed.append({"nodes": drafts + 1, "max_depth": depth, "choices": [list(p) for p in paths],
                            "expected_tokens": expected, "predicted_tokens_per_s": expected / step})
            if best is None or expected / step > best.predicted_tokens_per_s:
                best = PlannedTree(tree, expected, step, expected / step)
    if best is None:  # nothing is ever accepted: the cheapest tree
        tree = TreeSpec.chain(1)
        best = PlannedTree(tree, 1.0, costs.step_s(tree), 1.0 / costs.step_s(tree))
    best.candidates = weighed
    return best


def refine_in_loop(modelled: PlannedTree, acceptance: Acceptance, prompts: list, finalists: int, make_decoder,
                   new_tokens: int, rounds: int = 3, lookup_top: int = 0) -> tuple[PlannedTree, list]:
    """Time the cost model's `finalists` best distinct trees (and the one-draft chain) in real decoding steps on
    the calibration prompts, and keep the one of most expected tokens per in-loop second. Parts timed apart
    miss what a step does to them together (the drafter's and the verifier's weights evicting each other from
    the caches; on a small CPU the part timings alone were off by a third); a step's own clocks are not.
    A tree's step time is the generate stats' draft + verify + bookkeeping per step (prefill excluded; each
    step ends in its read-back, so on a GPU it includes the device's time), the median over `rounds` rounds
    that visit every tree in turn, so a burst of noise on a shared machine hits one sample, not one tree."""
    ranked = sorted(modelled.candidates, key=lambda c: -c["predicted_tokens_per_s"])
    trees, seen = [], set()
    for candidate in [{"choices": [[0]]}] + ranked:
        key = str(candidate.get("choices"))
        if key not in seen:
            seen.add(key)
            trees.append(TreeSpec.static(candidate["choices"]).with_lookup_top_within(lookup_top))
        if len(trees) > finalists:
            break
    decoders = [make_decoder(tree) for tree in trees]
    for decoder in decoders:
        decoder.generate(prompts[0], 4)  # warm-up: caches, plan
    samples = [[] for _ in trees]
    for round_index in range(rounds):
        ids = prompts[round_index % len(prompts)]
        for decoder, times in zip(decoders, samples):
            stats = decoder.generate(ids, new_tokens, attention_mask=torch.ones_like(ids)).stats
            timings = stats["timings"]  # a graphed step has one clock for the whole step
            spent = timings.get("step_s") or sum(timings[p] for p in ("draft_s", "verify_forward_s", "bookkeeping_s"))
            times.append(spent / max(stats["steps"], 1))
    rows, best = [], None
    for tree, times in zip(trees, samples):
        step = statistics.median(times)
        expected = acceptance.expected_tokens(tree)
        rows.append({"tree": str(tree), "nodes": tree.num_nodes, "expected_tokens": expected, "step_ms": 1e3 * step,
                     "step_ms_by_round": [1e3 * t for t in times], "predicted_tokens_per_s": expected / step})
        if best is None or expected / step > best.predicted_tokens_per_s:
            best = PlannedTree(tree, expected, step, expected / step, modelled.candidates)
    return best, rows


def _median_s(fn, reps: int, device) -> float:
    """Median wall time of fn; on CUDA each sample waits for the GPU, so it is the GPU-inclusive time."""
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@torch.no_grad()
def measure_costs(decoder, input_ids: torch.Tensor, max_nodes: int, max_width: int, reps: int = 5) -> StepCosts:
    """Time the step's parts on `decoder`'s own runners at batch 1 (the prompt [1, P] fills the caches)."""
    with ops.value_checks(False):  # as inside generate
        return _measure_costs(decoder, input_ids, max_nodes, max_width, reps)


def _star(nodes: int, root: torch.Tensor, dtype):
    """A Draft of `nodes` nodes, every draft a child of the root: the same shapes and work as any tree of this size."""
    device = root.device
    parents = torch.zeros(1, nodes, dtype=torch.long, device=device)
    parents[0, 0] = -1
    visible = torch.eye(nodes, dtype=torch.bool, device=device)[None]
    visible[..., 0] = True
    depths = (parents >= 0).long()
    return Draft(root[:, None].expand(1, nodes).clone(), parents, additive(visible, dtype), depths, depths - 1,
                 torch.arange(nodes, device=device)[None])  # token values do not change the cost


def _measure_costs(decoder, input_ids, max_nodes, max_width, reps) -> StepCosts:
    mask = torch.ones_like(input_ids)
    slots = input_ids.shape[1] + max(max_nodes, max_width + 1, decoder.drafter.tree_region) + 4
    with decoder.session(1, slots, slots) as step:
        step.prefill(input_ids, mask, draft_input_ids=decoder.drafter.draft_ids(input_ids), draft_attention_mask=mask)
        drafter, state = decoder.drafter, step.drafter_state
        device, dtype = input_ids.device, step.verifier.cache.dtype
        root = step.roots.clone()
        verify_s = {}
        for nodes in range(1, max_nodes + 1):
            draft = _star(nodes, root, dtype)
            verify_s[nodes] = _median_s(lambda: step.verify_forward(draft), reps, device)
        # Bookkeeping: verification, compaction, the read-back; a finished row (live 0) keeps the caches as they are.
        step.set_live([0])
        draft = _star(min(4, max_nodes), root, dtype)

        def whole_step():
            step.commit(draft, step.accept(draft, *step.verify_forward(draft)))
            step.read_back()

        overhead_s = max(_median_s(whole_step, reps, device) - verify_s[draft.tokens.shape[1]], 0.0)

        def root_step():
            return drafter.scores(drafter.states(drafter.root_forward(state, root), state.context)).topk(4, dim=-1)

        level_s = {}
        for width in range(1, max_width + 1):
            tokens = root[:, None].expand(1, width)
            offsets = 1 + torch.arange(width, device=device)[None]
            block = additive(torch.ones(1, width, 1 + width, dtype=torch.bool, device=device), dtype)
            context = state.context[:, None].expand(1, width, -1)

            def level_step():
                hidden = drafter.level_forward(state, tokens, 1, offsets, block)
                return drafter.scores(drafter.states(hidden, context)).topk(4, dim=-1)

            level_s[width] = _median_s(level_step, reps, device)
        return StepCosts(verify_s, _median_s(root_step, reps, device), level_s, overhead_s)


def plan_tree(target, draft, prompts: list, *, adapter=None, draft_layers: int | None = None, vocab_map=None,
              max_nodes: int = 16, max_depth: int = 6, ranks: int = 4, new_tokens: int = 48, reps: int = 5,
              finalists: int = 5, lean: bool | None = None, lookup_top: int = 0,
              progress: bool = True) -> tuple[PlannedTree, dict]:
    """Calibrate acceptance on `prompts` ([1, P] id tensors, not the evaluation prompts), time the step's
    parts, rank every tree by the cost model, time the `finalists` best of them in the loop itself, and return
    the best with a report: q, the costs, every tree weighed, the in-loop step times, and the chosen tree's
    measured tokens/s on the calibration prompts next to its prediction. lookup_top: every tree, the
    calibration comb included, copies its top path's first nodes from the context (TreeSpec.with_lookup_top),
    so q[d][0] is the top path's acceptance with the copies."""
    from tqdm import tqdm

    kwargs = dict(adapter=adapter, draft_layers=draft_layers, vocab_map=vocab_map, lean=lean)
    comb = SpeculativeDecoder(target, draft, tree=comb_tree(max_depth, ranks).with_lookup_top_within(lookup_top),
                              **kwargs)
    totals = {"accepted_by_depth_rank": [{} for _ in range(max_depth)], "row_steps": 0}
    for ids in tqdm(prompts, desc="calibrate acceptance", unit="prompt", disable=not progress):
        stats = comb.generate(ids, new_tokens, attention_mask=torch.ones_like(ids)).stats
        totals["row_steps"] += stats["row_steps"]
        for mine, theirs in zip(totals["accepted_by_depth_rank"], stats["accepted_by_depth_rank"]):
            for rank, count in theirs.items():
                mine[rank] = mine.get(rank, 0) + count
    acceptance = Acceptance.from_comb_stats(totals, ranks)
    del comb
    timer = SpeculativeDecoder(target, draft, tree=TreeSpec.chain(1), **kwargs)
    costs = measure_costs(timer, prompts[0], max_nodes, max_nodes, reps)
    modelled = best_tree(acceptance, costs, max_nodes, max_depth)
    planned, in_loop = refine_in_loop(modelled, acceptance, prompts, finalists,
                                      lambda tree: SpeculativeDecoder(target, draft, tree=tree, **kwargs), new_tokens,
                                      lookup_top=lookup_top)
    measured = SpeculativeDecoder(target, draft, tree=planned.tree, **kwargs)
    measured.generate(prompts[0], 8)
    tokens, seconds = 0, 0.0
    for ids in prompts:
        start = time.perf_counter()
        out = measured.generate(ids, new_tokens, attention_mask=torch.ones_like(ids))
        seconds += time.perf_counter() - start
        tokens += out.sequences.shape[1] - ids.shape[1]
    report = {"plan": planned.to_json(), "measured_tokens_per_s": tokens / seconds,
              "acceptance": asdict(acceptance), "calibration": {"prompts": len(prompts), "new_tokens": new_tokens,
                                                                "comb_depth": max_depth, "comb_ranks": ranks},
              "costs_ms": {"verify": {str(n): 1e3 * s for n, s in costs.verify_s.items()}, "root": 1e3 * costs.root_s,
                           "level": {str(w): 1e3 * s for w, s in costs.level_s.items()},
                           "overhead": 1e3 * costs.overhead_s},
              "cost_model_choice": {"tree": str(modelled.tree), "step_ms": 1e3 * modelled.step_s,
                                    "predicted_tokens_per_s": modelled.predicted_tokens_per_s},
              "in_loop": in_loop}
    return planned, report
