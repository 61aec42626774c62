"""verify_tree_greedy: equality with the reference, the accepted-path invariants, tie-breaks, duplicates."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sdalign_rt as sd
from sdalign_rt import reference
from strategies import make_parents, paths_of, planted_tokens, trees


def check_invariants(draft, parents, argmax, out):
    accept_nodes, accept_len, bonus = (t.cpu() for t in out)
    rows = parents.long().tolist()
    depth = max(len(paths_of(r, i)) for r in rows for i in range(len(r))) - 1
    assert accept_nodes.shape == (parents.shape[0], depth + 1) and accept_nodes.dtype == torch.int64
    for b, row in enumerate(rows):
        length = int(accept_len[b])
        path = accept_nodes[b, :length].tolist()
        assert bool((accept_nodes[b, length:] == -1).all())
        assert path == paths_of(row, path[-1])  # a root-to-node path
        for parent, child in zip(path, path[1:]):  # every step is a match
            assert int(draft[b, child]) == int(argmax[b, parent])
        assert int(bonus[b]) == int(argmax[b, path[-1]])
        # no accepted node is deeper, and equally deep accepted nodes have higher indices
        accepted = {0}
        for i in range(1, len(row)):
            if row[i] in accepted and int(draft[b, i]) == int(argmax[b, row[i]]):
                accepted.add(i)
                assert len(paths_of(row, i)) < length or (len(paths_of(row, i)) == length and i >= path[-1])


@settings(max_examples=25)
@given(parents=trees(max_nodes=70), vocab=st.sampled_from([2, 5, 32000]), match=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
       seed=st.integers(0, 2**16))
def test_matches_reference_and_invariants(backend, device, parents, vocab, match, seed):
    draft, argmax = planted_tokens(parents, vocab, match, seed)
    out = sd.ops.verify_tree_greedy(draft.to(device), parents.to(device), argmax.to(device))
    check_invariants(draft, parents, argmax, out)
    for got, want in zip(out, reference.verify_tree_greedy(draft, parents, argmax)):
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("shape,n", [("chain", 1), ("chain", 17), ("star", 64), ("bushy", 64), ("deep", 64),
                                     ("random", 128)])
@pytest.mark.parametrize("match", [0.0, 0.7, 1.0])
def test_pinned_shapes(backend, device, shape, n, match):
    rng = np.random.default_rng(n)
    parents = torch.tensor([make_parents(shape, n, rng), make_parents("random", n, rng)])
    draft, argmax = planted_tokens(parents, 11, match, n)
    out = sd.ops.verify_tree_greedy(draft.to(device), parents.to(device), argmax.to(device))
    check_invariants(draft, parents, argmax, out)
    for got, want in zip(out, reference.verify_tree_greedy(draft, parents, argmax)):
        assert torch.equal(got.cpu(), want)
    if match == 1.0:  # everything matches: the deepest node (lowest index among equals) wins
        assert out[1].tolist() == [max(len(paths_of(r, i)) for i in range(n)) for r in parents.tolist()]


def test_chain_fully_accepted_and_rejected(backend, device):
    parents = torch.tensor([[-1, 0, 1, 2, 3]], device=device)
    argmax = torch.tensor([[10, 11, 12, 13, 14]], device=device)
    draft = torch.tensor([[99, 10, 11, 12, 13]], device=device)
    nodes, length, bonus = sd.ops.verify_tree_greedy(draft, parents, argmax)
    assert nodes.tolist() == [[0, 1, 2, 3, 4]] and length.tolist() == [5] and bonus.tolist() == [14]
    draft[0, 3] = 0  # the mismatch cuts the chain after node 2
    nodes, length, bonus = sd.ops.verify_tree_greedy(draft, parents, argmax)
    assert nodes.tolist() == [[0, 1, 2, -1, -1]] and length.tolist() == [3] and bonus.tolist() == [12]


def test_duplicate_siblings_and_ties(backend, device):
    """Siblings 1 and 2 draft the same token: both are accepted; their subtrees compete on depth, then on index."""
    parents = torch.tensor([[-1, 0, 0, 1, 2, 2], [-1, 0, 0, 1, 2, 4]], device=device)
    argmax = torch.tensor([[7, 3, 5, 0, 0, 0], [7, 3, 5, 0, 1, 0]], device=device)
    draft = torch.tensor([[0, 7, 7, 3, 5, 5], [0, 7, 7, 3, 5, 1]], device=device)
    nodes, length, bonus = sd.ops.verify_tree_greedy(draft, parents, argmax)
    # row 0: nodes 3, 4, 5 all at depth 2 and accepted: the lowest index (3) wins
    # row 1: node 5 (depth 3, under 2 -> 4) is deeper than node 3
    assert nodes.tolist() == [[0, 1, 3, -1], [0, 2, 4, 5]]
    assert length.tolist() == [3, 4] and bonus.tolist() == [0, 0]


def test_max_depth_argument(backend, device):
    parents = torch.tensor([[-1, 0, 1]], device=device)
    tokens = torch.tensor([[0, 1, 2]], device=device)
    argmax = torch.tensor([[1, 2, 3]], device=device)
    nodes, _, _ = sd.ops.verify_tree_greedy(tokens, parents, argmax, max_depth=4)
    assert nodes.tolist() == [[0, 1, 2, -1, -1]]
    with pytest.raises(ValueError, match="max_depth=1 is smaller than the trees' depth 2"):
        sd.ops.verify_tree_greedy(tokens, parents, argmax, max_depth=1)


@pytest.mark.parametrize("call,message", [
    (lambda p, t: sd.ops.verify_tree_greedy(t[:, :2], p, t), r"draft_tokens must have shape \(1, 3\)"),
    (lambda p, t: sd.ops.verify_tree_greedy(t, p, t.float()), "target_argmax must have dtype"),
    (lambda p, t: sd.ops.verify_tree_greedy(t, torch.tensor([[-1, 2, 0]]), t), "parents is not a tree"),
    (lambda p, t: sd.ops.verify_tree_greedy(t, p, t.expand(2, 3)), r"target_argmax must have shape \(1, 3\)"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.tensor([[-1, 0, 1]]), torch.tensor([[1, 2, 3]]))
