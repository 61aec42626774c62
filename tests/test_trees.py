"""TreeSpec (chain / static / dynamic) and EAGLE-2 selection of the kept draft nodes."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sdalign_rt as sd
from strategies import paths_of, trees

MEDUSA_LIKE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 2)]


def test_chain():
    spec = sd.TreeSpec.chain(4)
    assert spec.parents() == [-1, 0, 1, 2, 3] and spec.ranks() == [-1, 0, 0, 0, 0]
    assert spec.num_nodes == 5 and spec.depth == 4 and spec.top_k == 1


def test_static_orders_parents_first_and_keeps_ranks():
    spec = sd.TreeSpec.static(reversed(MEDUSA_LIKE))
    assert spec.choices[:3] == ((0,), (1,), (2,))
    parents = spec.parents()
    for i, path in enumerate(spec.choices, start=1):
        assert parents[i] < i
        assert spec.choices[parents[i] - 1] == path[:-1] if len(path) > 1 else parents[i] == 0
    assert spec.ranks()[1:] == [p[-1] for p in spec.choices]
    assert (spec.depth, spec.top_k, spec.total_tokens) == (3, 3, 8)


def test_static_plan_builds_the_masks_once(backend, device):
    spec = sd.TreeSpec.static(MEDUSA_LIKE)
    parents = spec.parents_tensor(batch=3, device=device)
    assert parents.shape == (3, 9)
    masks = sd.ops.build_tree(parents, 10)
    for i in range(9):  # node i attends exactly to its rank path's prefixes
        visible = torch.nonzero(masks.mask[0, 0, i]).flatten().tolist()
        assert visible == paths_of(spec.parents(), i)


@pytest.mark.parametrize("choices,message", [
    ([], "must not be empty"),
    ([(0, 1)], r"\(0, 1\) needs its parent \(0,\)"),
    ([(0,), (1, 0)], r"\(1, 0\) needs its parent \(1,\)"),
    ([(0,), (0,)], "listed twice"),
    ([(0,), (-1,)], "negative rank"),
    ([(0,), ()], "empty path"),
])
def test_static_errors(choices, message):
    with pytest.raises(ValueError, match=message):
        sd.TreeSpec.static(choices)


def test_dynamic_spec():
    spec = sd.TreeSpec.dynamic(top_k=4, depth=5, total_tokens=40)
    assert spec.num_nodes == 41 and not spec.is_static
    with pytest.raises(ValueError, match="no fixed parents"):
        spec.parents()
    with pytest.raises(ValueError, match="exceeds the 10 candidates"):
        sd.TreeSpec.dynamic(top_k=2, depth=3, total_tokens=13)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        sd.TreeSpec.dynamic(top_k=0, depth=3, total_tokens=2)


def expand(top_k: int, depth: int, seed: int):
    """EAGLE-2-style candidates: the root's top_k children, then per level the top_k best frontier nodes
    each expanded by top_k children; scores are cumulative log-probs."""
    gen = torch.Generator().manual_seed(seed)
    parents, scores, tokens = [], [], []

    def children(parent, base):
        logp = torch.log_softmax(torch.randn(top_k + 3, generator=gen), 0).topk(top_k).values
        for r in range(top_k):
            parents.append(parent)
            scores.append(base + float(logp[r]))
            tokens.append(int(torch.randint(0, 100, (), generator=gen)))

    children(-1, 0.0)
    frontier = list(range(top_k))
    for _ in range(depth - 1):
        best = sorted(frontier, key=lambda c: -scores[c])[:top_k]
        start = len(parents)
        for c in sorted(best):
            children(c, scores[c])
        frontier = list(range(start, len(parents)))
    return torch.tensor(parents), torch.tensor(tokens), torch.tensor(scores)


@settings(max_examples=25)
@given(top_k=st.integers(1, 4), depth=st.integers(1, 5), fraction=st.floats(0.1, 1.0), batch=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_select_dynamic_tree_keeps_the_best_closed_set(top_k, depth, fraction, batch, seed):
    rows = [expand(top_k, depth, seed + b) for b in range(batch)]
    cand_parents = torch.stack([r[0] for r in rows])
    cand_tokens = torch.stack([r[1] for r in rows])
    cand_scores = torch.stack([r[2] for r in rows])
    total = max(1, int(fraction * cand_parents.shape[1]))
    parents, tokens, kept = sd.select_dynamic_tree(cand_parents, cand_tokens, cand_scores, total)
    assert parents.shape == tokens.shape == (batch, total + 1) and kept.shape == (batch, total)
    sd.ops.build_tree(parents, 0)  # a valid tree: root first, parents precede children
    for b in range(batch):
        chosen = kept[b].tolist()
        # the kept set is the best `total` candidates by score
        threshold = sorted(cand_scores[b].tolist(), reverse=True)[total - 1]
        assert all(float(cand_scores[b, c]) >= threshold for c in chosen)
        # each kept node hangs under its candidate parent, with its token
        for i, c in enumerate(chosen, start=1):
            parent = int(cand_parents[b, c])
            assert int(parents[b, i]) == (0 if parent < 0 else chosen.index(parent) + 1)
            assert int(tokens[b, i]) == int(cand_tokens[b, c])


def test_select_dynamic_tree_errors():
    parents = torch.tensor([[-1, -1, 0]])
    tokens = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="must not increase from parent to child"):
        sd.select_dynamic_tree(parents, tokens, torch.tensor([[-1.0, -2.0, -0.5]]), 2)
    with pytest.raises(ValueError, match="parents before children"):
        sd.select_dynamic_tree(torch.tensor([[-1, 2, 0]]), tokens, torch.tensor([[-1.0, -2.0, -3.0]]), 2)
    with pytest.raises(ValueError, match=r"total_tokens must be an int in \[1, 3\]"):
        sd.select_dynamic_tree(parents, tokens, torch.tensor([[-1.0, -2.0, -3.0]]), 4)


def test_ties_keep_parents():
    """Equal scores (a child with log-prob 0) keep the parent, which comes first."""
    parents = torch.tensor([[-1, 0, 1, -1]])
    scores = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    tree, _, kept = sd.select_dynamic_tree(parents, torch.tensor([[5, 6, 7, 8]]), scores, 3)
    assert kept.tolist() == [[0, 1, 2]] and tree.tolist() == [[-1, 0, 1, 2]]


def test_parse(tmp_path):
    assert sd.TreeSpec.parse("chain:3") == sd.TreeSpec.chain(3)
    assert sd.TreeSpec.parse("dynamic:2,3,6") == sd.TreeSpec.dynamic(2, 3, 6)
    assert sd.TreeSpec.parse("static:[[0],[1],[0,0]]") == sd.TreeSpec.static([(0,), (1,), (0, 0)])
    (tmp_path / "tree.json").write_text("[[0], [0, 0]]")
    assert sd.TreeSpec.parse(f"static:{tmp_path / 'tree.json'}") == sd.TreeSpec.static([(0,), (0, 0)])
    with pytest.raises(ValueError, match="tree must be chain:DEPTH"):
        sd.TreeSpec.parse("bushy:3")
    with pytest.raises(ValueError, match="cannot read tree 'chain:x'"):
        sd.TreeSpec.parse("chain:x")


@settings(max_examples=20)
@given(tree=trees(max_nodes=70))
def test_ancestor_closure_matches_build_tree(tree):
    mask, depth = sd.trees.ancestor_closure(tree)
    expected = sd.ops.build_tree(tree, 0)
    assert torch.equal(mask, expected.mask[:, 0]) and torch.equal(depth, expected.depth)


@pytest.mark.parametrize("text", ["chain:3", "static:[[0],[1],[0,0],[0,0,2]]", "dynamic:3,4,10"])
def test_text_form_round_trips(text):
    assert str(sd.TreeSpec.parse(text)) == text


def test_tree_plan_runs_only_nodes_with_children():
    """The worked example of tree_plan.py: only the root and node 1 have children, so the drafter runs those two
    (at offsets 0 and 1 of its tree region); the second-ranked node 2 and the leaf 3 never run."""
    from sdalign_rt.tree_plan import TreePlan

    plan = TreePlan.build(sd.TreeSpec.static([(0,), (1,), (0, 0)]), "cpu", torch.float32, batch=2)
    assert plan.levels == ((0, 1), (1, 3), (3, 4)) and plan.depths.tolist() == [[0, 1, 1, 2]]
    assert [e.tolist() for e in plan.expanded] == [[0], [1], []]
    assert plan.parent_in_level[1].tolist() == [0, 0] and plan.parent_in_level[2].tolist() == [0]
    assert plan.children_needed[1:] == (2, 1) and plan.drafter_offsets.tolist() == [[0, 1, -1, -1]]
    assert plan.parents.tolist() == [[-1, 0, 0, 1]] * 2
    assert (plan.block[0] == 0).tolist() == [[True, False, False, False], [True, True, False, False],
                                             [True, False, True, False], [True, True, False, True]]
