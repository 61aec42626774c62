"""cosine_accept and adapter_cosine_accept against the reference: sims, accept masks, counts, edge cases."""
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import sdalign_rt as sd
from sdalign_rt import reference
from strategies import LAYOUTS, hidden_states, strided
from test_fused_adapter import TOLERANCE, adapter_weights

SIM_ATOL = 2e-6  # sims are fp32 sums of D products: the backends differ only in summation order
MODES = ("consecutive", "relaxed")


def correlated_pair(batch, positions, hidden, dtype, seed, noise):
    """(a, b) whose per-position cosine spreads over (0, 1): b = a + noise * N(0, 1) with noise varying."""
    a = hidden_states((batch, positions, hidden), torch.float32, seed)
    scale = torch.linspace(0.1, noise, positions).view(1, positions, 1)
    b = a + scale * hidden_states((batch, positions, hidden), torch.float32, seed + 1)
    return a.to(dtype), b.to(dtype)


def assert_accept_matches(out, expected, threshold, mode):
    sims, accept, n_accept = out
    assert sims.dtype == torch.float32 and accept.dtype == torch.bool and n_accept.dtype == torch.int64
    torch.testing.assert_close(sims, expected[0], atol=SIM_ATOL, rtol=0)
    assert torch.equal(accept, sims >= threshold)
    assert torch.equal(n_accept, reference.count_accepted(accept, mode))
    if not bool(((expected[0] - threshold).abs() < 2 * SIM_ATOL).any()):
        assert torch.equal(accept, expected[1]) and torch.equal(n_accept, expected[2])


@settings(max_examples=15)
@given(
    batch=st.integers(1, 4), positions=st.sampled_from([1, 2, 5, 16, 33]), hidden=st.sampled_from([8, 64, 200]),
    dtype=st.sampled_from(list(TOLERANCE)), layout=st.sampled_from(LAYOUTS), mode=st.sampled_from(MODES),
    threshold=st.sampled_from([-1.0, 0.0, 0.5, 0.8, 0.9, 0.95, 1.0, 1.5]), zero_rows=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_cosine_matches_reference(backend, device, batch, positions, hidden, dtype, layout, mode, threshold,
                                  zero_rows, seed):
    a, b = correlated_pair(batch, positions, hidden, dtype, seed, noise=3.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(zero_rows):  # zero-norm rows in either input must give sim 0
        which = a if torch.rand((), generator=gen) < 0.5 else b
        which[torch.randint(0, batch, (), generator=gen), torch.randint(0, positions, (), generator=gen)] = 0
    a, b = strided(a, layout).to(device), strided(b, layout).to(device)
    expected = reference.cosine_accept(a, b, threshold, mode)
    assert_accept_matches(sd.ops.cosine_accept(a, b, threshold, mode), expected, threshold, mode)


@pytest.mark.parametrize("positions", [1, 5, 16, 64])
@pytest.mark.parametrize("mode", MODES)
def test_cosine_7b_dims(backend, device, positions, mode):
    a, b = correlated_pair(2, positions, 4096, torch.bfloat16, positions, noise=2.0)
    expected = reference.cosine_accept(a, b, 0.85, mode)
    assert_accept_matches(sd.ops.cosine_accept(a.to(device), b.to(device), 0.85, mode),
                          [e.to(device) for e in expected], 0.85, mode)


def test_cosine_semantics(backend, device):
    """The contract spelled out on a hand-made case: zero rows, exact threshold, leading run vs count."""
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]], device=device)
    b = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [3.0, 0.0]]], device=device)
    sims, accept, n = sd.ops.cosine_accept(a, b, threshold=0.5, mode="consecutive")
    torch.testing.assert_close(sims, torch.tensor([[1.0, 2 ** -0.5, 0.0, -1.0, 1.0]], device=device))
    assert accept.tolist() == [[True, True, False, False, True]]
    assert n.tolist() == [2]
    assert sd.ops.cosine_accept(a, b, threshold=0.5, mode="relaxed")[2].tolist() == [3]
    assert sd.ops.cosine_accept(a, b, threshold=1.0, mode="relaxed")[2].tolist() == [2]  # sims == 1 pass >= 1
    assert sd.ops.cosine_accept(a, b, threshold=1.01, mode="relaxed")[2].tolist() == [0]
    assert sd.ops.cosine_accept(a, b, threshold=-1.0, mode="consecutive")[2].tolist() == [5]


def test_identical_rows_accept_at_one(backend, device):
    a = hidden_states((3, 7, 96), torch.float32, 1).to(device)
    sims, accept, n = sd.ops.cosine_accept(a, a.clone(), threshold=0.999999, mode="consecutive")
    assert bool(accept.all()) and n.tolist() == [7, 7, 7]
    assert float(sims.max()) <= 1.0


@settings(max_examples=10)
@given(
    batch=st.integers(1, 3), positions=st.sampled_from([1, 3, 16, 20]), hidden=st.sampled_from([32, 80]),
    bottleneck=st.sampled_from([16, 40]), dtype=st.sampled_from(list(TOLERANCE)), mode=st.sampled_from(MODES),
    threshold=st.sampled_from([0.0, 0.7, 0.9, 1.1]), layout=st.sampled_from(LAYOUTS), bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_adapter_cosine_matches_reference(backend, device, batch, positions, hidden, bottleneck, dtype, mode,
                                          threshold, layout, bias, seed):
    a, b = correlated_pair(batch, positions, hidden, dtype, seed, noise=2.0)
    a, b = strided(a, layout).to(device), strided(b, layout).to(device)
    weights = [w.to(device) if w is not None else None for w in adapter_weights(hidden, bottleneck, dtype, seed, bias)]
    adapted, *accept_out = sd.ops.adapter_cosine_accept(a, b, *weights, threshold=threshold, mode=mode)
    expected = reference.adapter_cosine_accept(a, b, *weights, threshold, mode)
    assert adapted.shape == a.shape and adapted.dtype == a.dtype
    torch.testing.assert_close(adapted.float(), expected[0].float(), **TOLERANCE[dtype])
    # The fused op's sims are those of its own adapted output (rounded as stored).
    own = reference.cosine_accept(adapted, b, threshold, mode)
    assert_accept_matches(accept_out, own, threshold, mode)
    assume(not bool(((expected[1] - threshold).abs() < 1e-3).any()))
    assert torch.equal(accept_out[2], expected[3])


@pytest.mark.parametrize("positions", [1, 5, 16, 64])
def test_adapter_cosine_7b_dims(backend, device, positions):
    a, b = correlated_pair(1, positions, 4096, torch.bfloat16, positions, noise=1.0)
    weights = [w.to(device) for w in adapter_weights(4096, 256, torch.bfloat16, 3)]
    adapted, *accept_out = sd.ops.adapter_cosine_accept(a.to(device), b.to(device), *weights, 0.9, "consecutive")
    torch.testing.assert_close(adapted.float(), reference.fused_adapter(a.to(device), *weights).float(),
                               **TOLERANCE[torch.bfloat16])
    assert_accept_matches(accept_out, reference.cosine_accept(adapted, b.to(device), 0.9, "consecutive"), 0.9,
                          "consecutive")


@pytest.mark.parametrize("call,message", [
    (lambda a, b: sd.ops.cosine_accept(a, b[:, :-1], 0.9), "b must have shape"),
    (lambda a, b: sd.ops.cosine_accept(a[0], b[0], 0.9), "a must have 3 dims"),
    (lambda a, b: sd.ops.cosine_accept(a, b.long(), 0.9), "b must have dtype"),
    (lambda a, b: sd.ops.cosine_accept(a, b, 0.9, mode="greedy"), "mode must be one of"),
    (lambda a, b: sd.ops.cosine_accept(a, b, float("nan")), "threshold must not be nan"),
    (lambda a, b: sd.ops.cosine_accept(a, b, "high"), "threshold must be a number"),
    (lambda a, b: sd.ops.cosine_accept(a.masked_fill(a > 1, float("inf")), b, 0.9), "a contains non-finite"),
    (lambda a, b: sd.ops.adapter_cosine_accept(a, b, *adapter_weights(16, 8, torch.float32, 0), 0.9),
     "w_down must have shape"),
])
def test_bad_input(call, message):
    a, b = correlated_pair(2, 3, 32, torch.float32, 0, noise=1.0)
    with pytest.raises(ValueError, match=message):
        call(a, b)


def test_value_checks_can_be_turned_off(backend, device):
    """The decoding loop turns off content checks (a host sync on CUDA); shapes are still checked, and a
    non-finite row then gives a nan sim that no threshold accepts."""
    a, b = correlated_pair(1, 2, 8, torch.float32, 0, noise=1.0)
    a[0, 0, 0] = float("nan")
    a, b = a.to(device), b.to(device)
    with sd.ops.value_checks(False):
        sims, accept, n = sd.ops.cosine_accept(a, b, -1.0, "relaxed")
        with pytest.raises(ValueError, match="b must have shape"):
            sd.ops.cosine_accept(a, b[:, :1], 0.5)
    assert torch.isnan(sims[0, 0]) and not bool(accept[0, 0]) and n.tolist() == [1]


@pytest.mark.parametrize("split", [False, True], ids=["one-launch", "split"])
@pytest.mark.parametrize("batch,positions,hidden,bottleneck", [(1, 5, 4096, 256), (3, 20, 80, 40), (2, 70, 64, 16)])
def test_adapter_cosine_both_launch_paths(device, split, batch, positions, hidden, bottleneck):
    """One fused launch per batch row, or the decode-size split adapter + cosine_accept: the same outputs."""
    if "triton" not in sd.ops.available_backends(device):
        pytest.skip("triton backend not available")
    from sdalign_rt.kernels.adapter_cosine_accept import adapter_cosine_accept as launch

    a, b = correlated_pair(batch, positions, hidden, torch.bfloat16, positions, noise=1.0)
    a, b = a.to(device), b.to(device)
    weights = [w.to(device) for w in adapter_weights(hidden, bottleneck, torch.bfloat16, 3)]
    adapted, *accept_out = launch(a, b, *weights, 0.5, "consecutive", split=split)
    torch.testing.assert_close(adapted.float(), reference.fused_adapter(a, *weights).float(),
                               **TOLERANCE[torch.bfloat16])
    assert_accept_matches(accept_out, reference.cosine_accept(adapted, b, 0.5, "consecutive"), 0.5, "consecutive")
