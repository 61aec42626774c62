"""build_tree: equality with the reference and the invariants of DESIGN.md, on many tree shapes."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sdalign_rt as sd
from sdalign_rt import reference
from strategies import make_parents, paths_of, trees


def check_invariants(parents: torch.Tensor, prefix: torch.Tensor, masks: sd.TreeMasks):
    batch, n = parents.shape
    rows = parents.long().tolist()
    assert masks.positions.shape == (batch, n) and masks.positions.dtype == torch.int64
    assert masks.mask.shape == (batch, 1, n, n) and masks.mask.dtype == torch.bool
    assert masks.bitmask.shape == (batch, n, (n + 31) // 32) and masks.bitmask.dtype == torch.int32
    assert masks.retrieve.dtype == torch.int64
    mask = masks.mask[:, 0].cpu()
    bits = masks.bitmask.cpu().long() & 0xFFFFFFFF
    leaves_per_row = []
    for b in range(batch):
        leaves = [i for i in range(n) if i not in set(rows[b][1:])]
        leaves_per_row.append(leaves)
        for i in range(n):
            path = paths_of(rows[b], i)
            # mask row i = i plus its ancestors; positions = prefix + depth
            assert set(torch.nonzero(mask[b, i]).flatten().tolist()) == set(path)
            assert int(masks.positions[b, i]) == int(prefix[b]) + len(path) - 1
            for j in range(n):
                assert bool((bits[b, i, j // 32] >> (j % 32)) & 1) == (j in path)
        for r, leaf in enumerate(leaves):
            path = paths_of(rows[b], leaf)
            assert masks.retrieve[b, r].tolist() == path + [-1] * (masks.retrieve.shape[2] - len(path))
        assert bool((masks.retrieve[b, len(leaves):] == -1).all())
    depth = max(len(paths_of(r, i)) for r in rows for i in range(n)) - 1
    assert masks.retrieve.shape == (batch, max(map(len, leaves_per_row)), depth + 1)


def assert_same(masks, expected):
    for name in expected._fields:
        got, want = getattr(masks, name), getattr(expected, name)
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert torch.equal(got.cpu(), want.cpu()), name


@settings(max_examples=25)
@given(parents=trees(max_nodes=70), prefix=st.integers(0, 4096), prefix_as_int=st.booleans())
def test_matches_reference_and_invariants(backend, device, parents, prefix, prefix_as_int):
    batch = parents.shape[0]
    prefix_len = prefix if prefix_as_int else torch.arange(batch, dtype=torch.int64) * 7 + prefix
    prefix_t = torch.full((batch,), prefix) if prefix_as_int else prefix_len
    parents = parents.to(device)
    masks = sd.ops.build_tree(parents, prefix_len if prefix_as_int else prefix_len.to(device))
    check_invariants(parents.cpu(), prefix_t, masks)
    assert_same(masks, reference.build_tree(parents.cpu(), prefix_t))


@pytest.mark.parametrize("shape,n", [("chain", 1), ("chain", 17), ("star", 64), ("random", 64), ("bushy", 64),
                                     ("deep", 128), ("random", 128), ("random", 33)])
def test_pinned_shapes(backend, device, shape, n):
    """Single-node tree, chain of depth 16, 64-node trees, the 128-node kernel limit, a 33-node two-word mask."""
    rng = np.random.default_rng(n)
    parents = torch.tensor([make_parents(shape, n, rng), make_parents("random", n, rng)], device=device)
    prefix = torch.tensor([0, 100], device=device)
    masks = sd.ops.build_tree(parents, prefix)
    check_invariants(parents.cpu(), prefix.cpu(), masks)
    assert_same(masks, reference.build_tree(parents.cpu(), prefix.cpu()))


def test_example_from_design(backend, device):
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2]], device=device)
    masks = sd.ops.build_tree(parents, torch.tensor([3], device=device))
    assert masks.positions.tolist() == [[3, 4, 4, 5, 5, 5]]
    assert masks.bitmask[..., 0].tolist() == [[0b1, 0b11, 0b101, 0b1011, 0b10011, 0b100101]]
    assert masks.retrieve.tolist() == [[[0, 1, 3], [0, 1, 4], [0, 2, 5]]]
    assert masks.depth.tolist() == [[0, 1, 1, 2, 2, 2]]
    bias = masks.additive_mask(torch.float16)
    assert bias.dtype == torch.float16 and bool((bias[masks.mask] == 0).all())
    assert bool((bias[~masks.mask] == torch.finfo(torch.float16).min).all())


def test_bit_31_is_the_sign_bit(backend, device):
    """Node 31's own bit is bit 31 of word 0: the packed int32 is negative."""
    parents = torch.tensor([make_parents("chain", 40, None)], device=device)
    masks = sd.ops.build_tree(parents, 0)
    assert int(masks.bitmask[0, 31, 0]) == -1 and int(masks.bitmask[0, 39, 1]) == 0xFF


@pytest.mark.parametrize("parents,message", [
    ([[0, 0, 1]], r"parents\[0, 0\] must be -1"),
    ([[-1, 1, 1]], r"parents\[0, 1\] = 1, expected a node index in \[0, 1\)"),
    ([[-1, 0, 3, 1]], r"parents\[0, 2\] = 3"),
    ([[-1, 0, -1]], r"parents\[0, 2\] = -1"),
    ([[-1, 0, 1], [-1, 0, 5]], r"parents\[1, 2\] = 5"),
])
def test_not_a_tree(backend, parents, message):
    with pytest.raises(ValueError, match="parents is not a tree: " + message):
        sd.ops.build_tree(torch.tensor(parents), 0)


@pytest.mark.parametrize("call,message", [
    (lambda: sd.ops.build_tree(torch.tensor([-1, 0]), 0), "parents must have 2 dims"),
    (lambda: sd.ops.build_tree(torch.tensor([[-1.0, 0.0]]), 0), "parents must have dtype"),
    (lambda: sd.ops.build_tree(torch.zeros(1, 0, dtype=torch.long), 0), "at least one node"),
    (lambda: sd.ops.build_tree(torch.tensor([[-1, 0]]), torch.tensor([1, 2])), "prefix_len must have shape"),
    (lambda: sd.ops.build_tree(torch.tensor([[-1, 0]]), torch.tensor([-1])), "prefix_len must be >= 0"),
    (lambda: sd.ops.build_tree(torch.tensor([[-1, 0]]), torch.tensor([1.0])), "prefix_len must have dtype"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_shape_hints_skip_nothing_but_the_sync(backend, device):
    """Passing the planned leaf count and depth gives the same TreeMasks; wrong hints are refused."""
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2], [-1, 0, 1, 2, 3, 4]], device=device)
    planned = sd.ops.build_tree(parents, 2, num_leaves=3, max_depth=5)
    assert_same(planned, sd.ops.build_tree(parents, 2))
    with pytest.raises(ValueError, match="do not describe these trees"):
        sd.ops.build_tree(parents, 2, num_leaves=3, max_depth=4)
    with pytest.raises(ValueError, match="together"):
        sd.ops.build_tree(parents, 2, num_leaves=3)
