"""fused_adapter against the reference: shapes, dtypes, layouts, 7B dims, limits and bad input."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sdalign_rt as sd
from sdalign_rt import reference
from strategies import LAYOUTS, hidden_states, strided

# |y - ref| <= atol + rtol * |ref|. The reference rounds at the kernel's rounding points (matmul operands in
# the weights' dtype), so the gap is accumulation order: a few ulps of the output dtype at most.
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),  # fp16 ulp(1) = 9.8e-4
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),  # bf16 ulp(1) = 7.8e-3
}
DTYPES = list(TOLERANCE)


def adapter_weights(hidden, bottleneck, dtype, seed, bias=True):
    w_down = hidden_states((bottleneck, hidden), dtype, seed, scale=hidden ** -0.5)
    w_up = hidden_states((hidden, bottleneck), dtype, seed + 1, scale=bottleneck ** -0.5)
    b_down = hidden_states((bottleneck,), dtype, seed + 2, scale=0.1) if bias else None
    b_up = hidden_states((hidden,), dtype, seed + 3, scale=0.1) if bias else None
    return w_down, b_down, w_up, b_up


def check(x, weights, dtype):
    out = sd.ops.fused_adapter(x, *weights)
    expected = reference.fused_adapter(x, *weights)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE[dtype])
    return out


@settings(max_examples=12)
@given(
    lead=st.sampled_from([(), (1,), (5,), (2, 3), (1, 64), (3, 17)]),
    hidden=st.sampled_from([16, 48, 100, 256]),
    bottleneck=st.sampled_from([16, 24, 64, 100]),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(backend, device, lead, hidden, bottleneck, dtype, layout, bias, seed):
    x = hidden_states((*lead, hidden), dtype, seed)
    if x.dim() >= 2:
        x = strided(x, layout)
    weights = adapter_weights(hidden, bottleneck, dtype, seed, bias)
    if layout != "contiguous":  # weights in other layouts too (e.g. a transposed nn.Linear weight)
        weights = (strided(weights[0], layout), weights[1], strided(weights[2], layout), weights[3])
    check(x.to(device), [w.to(device) if w is not None else None for w in weights], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("rows", [1, 5, 16, 64])
def test_7b_dims(backend, device, dtype, rows):
    """D=4096, R=256: the EventGPT / Vicuna-7B adapter."""
    x = hidden_states((rows, 4096), dtype, rows).to(device)
    check(x, [w.to(device) for w in adapter_weights(4096, 256, dtype, 7)], dtype)


@pytest.mark.parametrize("hidden,bottleneck", [(8192, 32), (64, 512)])
def test_size_limits(backend, device, hidden, bottleneck):
    x = hidden_states((3, hidden), torch.float32, 0).to(device)
    check(x, [w.to(device) for w in adapter_weights(hidden, bottleneck, torch.float32, 1)], torch.float32)


def test_mixed_dtypes_follow_the_weights(backend, device):
    """bf16 activations through fp32 weights: fp32 math, bf16 output."""
    x = hidden_states((4, 64), torch.bfloat16, 0).to(device)
    weights = [w.to(device) for w in adapter_weights(64, 16, torch.float32, 1)]
    out = sd.ops.fused_adapter(x, *weights)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference.fused_adapter(x, *weights).float(), **TOLERANCE[torch.bfloat16])


def test_zero_up_projection_is_identity(backend, device):
    x = hidden_states((2, 5, 128), torch.float32, 3).to(device)
    w_down, b_down, _, _ = adapter_weights(128, 32, torch.float32, 4)
    out = sd.ops.fused_adapter(x, w_down.to(device), b_down.to(device), torch.zeros(128, 32, device=device),
                               torch.zeros(128, device=device))
    assert torch.equal(out, x)


def test_empty_rows(backend, device):
    x = torch.empty(0, 32, device=device)
    out = sd.ops.fused_adapter(x, *[w.to(device) for w in adapter_weights(32, 16, torch.float32, 0)])
    assert out.shape == (0, 32)


@pytest.mark.parametrize("make_bad,message", [
    (lambda x, w: (x.long(), *w), "x must have dtype"),
    (lambda x, w: (x, w[0][:, :-1], *w[1:]), "w_down must have shape"),
    (lambda x, w: (x, w[0], w[1], w[2].t(), w[3]), "w_up must have shape"),
    (lambda x, w: (x, w[0], w[1][:-1], w[2], w[3]), "b_down must have shape"),
    (lambda x, w: (x, w[0], w[1], w[2], w[3][:-1]), "b_up must have shape"),
    (lambda x, w: (x, w[0], w[1], w[2].half(), w[3]), "w_down and w_up must share a dtype"),
    (lambda x, w: (x.masked_fill(x > 1, float("nan")), *w), "non-finite"),
    (lambda x, w: (x.numpy(), *w), "x must be a torch.Tensor"),
])
def test_bad_input(make_bad, message):
    x = hidden_states((3, 32), torch.float32, 0)
    with pytest.raises(ValueError, match=message):
        sd.ops.fused_adapter(*make_bad(x, adapter_weights(32, 16, torch.float32, 1)))


def test_triton_limits_are_explicit(device):
    if "triton" not in sd.ops.available_backends(device):
        pytest.skip("triton backend not available")
    x = torch.zeros(1, 32, device=device)
    weights = [w.to(device) for w in adapter_weights(32, 1024, torch.float32, 0)]
    with sd.ops.use_backend("triton"), pytest.raises(ValueError, match="bottleneck 1024 > 512"):
        sd.ops.fused_adapter(x, *weights)


@pytest.mark.parametrize("split", [False, True], ids=["one-launch", "split"])
@pytest.mark.parametrize("rows,hidden,bottleneck,dtype", [
    (1, 4096, 256, torch.bfloat16), (37, 4096, 256, torch.float32), (3, 100, 24, torch.float32),
    (5, 64, 512, torch.float16), (200, 48, 100, torch.bfloat16),
])
def test_both_launch_paths(device, split, rows, hidden, bottleneck, dtype):
    """The kernel's two paths (one program per row block; decode-size split over the bottleneck and the output
    columns) each match the reference, whichever the row count would pick."""
    if "triton" not in sd.ops.available_backends(device):
        pytest.skip("triton backend not available")
    from sdalign_rt.kernels.fused_adapter import fused_adapter as launch

    x = strided(hidden_states((rows, hidden), dtype, rows), "transposed").to(device)
    weights = [w.to(device) for w in adapter_weights(hidden, bottleneck, dtype, 5)]
    out = launch(x, *weights, split=split)
    torch.testing.assert_close(out.float(), reference.fused_adapter(x, *weights).float(), **TOLERANCE[dtype])
