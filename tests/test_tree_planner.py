"""Trees planned from measured costs: acceptance calibrated by (depth, rank), expected tokens of a static tree,
the best tree for given costs, the whole plan on a tiny pair, and plan-tree's JSON as a --tree argument."""
import json

import pytest
import torch

pytest.importorskip("transformers")

import sdalign_rt as sd  # noqa: E402
from sdalign_rt.tree_planner import Acceptance, StepCosts, best_tree, comb_tree, plan_tree, top_paths  # noqa: E402
from test_decoder import DRAFTS, TARGET, VOCAB  # noqa: E402


def test_acceptance_from_a_comb_decode():
    """100 row-steps: depth 1 took rank 0 sixty times and rank 1 ten times; of the sixty, depth 2 took rank 0 thirty
    times and rank 2 six times."""
    stats = {"row_steps": 100, "accepted_by_depth_rank": [{"0": 60, "1": 10}, {"0": 30, "2": 6}, {}]}
    acceptance = Acceptance.from_comb_stats(stats, ranks=3)
    assert acceptance.q == [[0.6, 0.1, 0.0], [0.5, 0.0, 0.1], [0.0, 0.0, 0.0]]
    tree = sd.TreeSpec.static([(0,), (1,), (0, 0), (0, 2)])
    assert acceptance.expected_tokens(tree) == pytest.approx(1 + 0.6 + 0.1 + 0.3 + 0.06)


def test_copied_top_path_drafts_count_as_rank_0():
    """With lookup_top, an accepted copied draft on the top path ("lookup") stands where rank 0 would."""
    stats = {"row_steps": 100, "accepted_by_depth_rank": [{"0": 40, "lookup": 20, "1": 10}, {"0": 30}]}
    assert Acceptance.from_comb_stats(stats, ranks=2).q == [[0.6, 0.1], [0.5, 0.0]]


def test_plan_with_lookup_top_keeps_it_in_every_tree():
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    planned, report = plan_tree(TARGET, TARGET, [ids, ids.flip(1)], adapter=sd.BottleneckAdapter(64, 8),
                                draft_layers=1, max_nodes=4, max_depth=2, ranks=2, new_tokens=10, reps=1,
                                finalists=2, lookup_top=1, progress=False)
    assert planned.tree.lookup_top == 1 and all("+lookup-top:1" in row["tree"] for row in report["in_loop"])
    assert sd.TreeSpec.parse(report["plan"]["tree"]) == planned.tree


def test_top_paths_are_prefix_closed_and_best_first():
    acceptance = Acceptance([[0.6, 0.2], [0.5, 0.3], [0.4, 0.1]])
    assert top_paths(acceptance, 5, 3) == [(0,), (0, 0), (1,), (0, 1), (0, 0, 0)]  # 0.6, 0.3, 0.2, 0.18, 0.12
    assert top_paths(acceptance, 3, 1) == [(0,), (1,)]  # depth 1 holds two candidates only


def test_best_tree_weighs_costs():
    """A verifier forward that costs nothing extra up to 4 nodes and a lot beyond: the plan stays at 4 nodes."""
    acceptance = Acceptance([[0.7, 0.2], [0.7, 0.2], [0.7, 0.2], [0.7, 0.2]])
    costs = StepCosts({n: 1.0 if n <= 4 else 3.0 for n in range(1, 9)}, 0.05, {w: 0.05 for w in range(1, 9)}, 0.01)
    plan = best_tree(acceptance, costs, max_nodes=8, max_depth=4)
    assert plan.tree.num_nodes == 4 and plan.tree.choices == ((0,), (0, 0), (0, 0, 0))
    assert plan.predicted_tokens_per_s == pytest.approx(plan.expected_tokens / costs.step_s(plan.tree))
    cheap = StepCosts({n: 1.0 for n in range(1, 9)}, 0.0, {w: 0.0 for w in range(1, 9)}, 0.0)
    assert best_tree(acceptance, cheap, max_nodes=8, max_depth=4).tree.num_nodes == 8  # free nodes: use them all


def test_plan_on_a_tiny_pair(tmp_path):
    prompts = [torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    planned, report = plan_tree(TARGET, DRAFTS["perturbed"], prompts, max_nodes=6, max_depth=3, ranks=2,
                                new_tokens=12, reps=2, progress=False)
    assert 2 <= planned.tree.num_nodes <= 6 and planned.tree.depth <= 3
    assert report["measured_tokens_per_s"] > 0 and report["plan"]["predicted_tokens_per_s"] > 0
    assert len(report["acceptance"]["q"]) == 3 and set(report["costs_ms"]["verify"]) == {str(n) for n in range(1, 7)}
    # The finalists (the one-draft chain first) were timed in the loop; the plan is the best of them by those times.
    in_loop = report["in_loop"]
    assert in_loop[0]["tree"] == "static:[[0]]" and 2 <= len(in_loop) <= 6
    assert len({row["tree"] for row in in_loop}) == len(in_loop)
    best = max(in_loop, key=lambda row: row["predicted_tokens_per_s"])
    assert best["tree"] == str(planned.tree)
    assert report["plan"]["predicted_tokens_per_s"] == pytest.approx(best["predicted_tokens_per_s"])
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(report))
    assert sd.TreeSpec.parse(f"static:{path}") == planned.tree


def test_comb_tree_shape():
    assert comb_tree(2, 3).parents() == [-1, 0, 0, 0, 1, 1, 1]
