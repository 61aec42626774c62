"""cpu_linear: the same values as F.linear for every row count, dtype and layout; modules that are not plain
nn.Linear (4-bit layers, hooked modules) run as themselves."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sdalign_rt import cpu_linear


@settings(max_examples=40)
@given(rows=st.integers(1, 7), lead=st.sampled_from([(), (1,), (2,)]), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_matches_f_linear(rows, lead, bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, rows, 48, generator=gen).to(dtype)
    weight = torch.randn(40, 48, generator=gen).to(dtype)
    b = torch.randn(40, generator=gen).to(dtype) if bias else None
    expected = torch.nn.functional.linear(x, weight, b)
    out = cpu_linear.linear(x, weight, b)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), columns=st.sampled_from([7, 8, 48, 53]), out=st.sampled_from([1, 5, 40, 41]),
       seed=st.integers(0, 2**16))
def test_few_row_kernel_matches_f_linear(rows, columns, out, seed):
    """The extension's few_row_linear (3-8 rows): ragged K (not a multiple of 8), odd N (an unpaired last row)."""
    from sdalign_rt import _ext

    if not (_ext.cpp_available() and _ext.has_op("few_row_linear")):
        pytest.skip(f"the C++ extension is not built: {_ext.load_error}")
    gen = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(rows, columns, generator=gen), torch.randn(out, columns, generator=gen)
    torch.testing.assert_close(_ext.cpp_op("few_row_linear")(x, weight), torch.nn.functional.linear(x, weight),
                               rtol=1e-5, atol=1e-5)


def test_which_kernel_each_row_count_takes(monkeypatch):
    """1-2 rows: torch.mm; 3-8: few_row_linear (3-4 by a tall head: torch.mm); more: the module's own GEMM."""
    from sdalign_rt import _ext

    if not (_ext.cpp_available() and _ext.has_op("few_row_linear")):
        pytest.skip(f"the C++ extension is not built: {_ext.load_error}")
    calls = []
    op = _ext.cpp_op("few_row_linear")
    monkeypatch.setattr(cpu_linear, "_FEW_ROW", [lambda x, w: calls.append(len(x)) or op(x, w)])
    for rows in range(1, 11):
        cpu_linear.linear(torch.randn(rows, 16), torch.randn(24, 16))
    cpu_linear.linear(torch.randn(4, 16), torch.randn(cpu_linear.TALL, 16))
    cpu_linear.linear(torch.randn(5, 16), torch.randn(cpu_linear.TALL, 16))
    assert calls == [3, 4, 5, 6, 7, 8, 5]


def test_gradients_flow_for_every_row_count():
    """The extension's op has no backward: a projection that needs gradients takes a differentiable path."""
    for rows in (1, 3, 6, 9):
        x = torch.randn(rows, 16, requires_grad=True)
        weight = torch.randn(24, 16, requires_grad=True)
        cpu_linear.linear(x, weight).sum().backward()
        torch.testing.assert_close(x.grad, weight.detach().sum(0).expand(rows, -1))
        torch.testing.assert_close(weight.grad, x.detach().sum(0).expand(24, -1))


def test_non_contiguous_rows_and_the_switch(monkeypatch):
    x = torch.randn(8, 3).T  # [3, 8], a transposed view
    weight = torch.randn(5, 8)
    torch.testing.assert_close(cpu_linear.linear(x, weight), x @ weight.T)
    monkeypatch.setenv("SDALIGN_RT_CPU_LINEAR", "module")
    assert not cpu_linear.enabled()
    torch.testing.assert_close(cpu_linear.linear(x, weight), x @ weight.T)


def test_project_runs_other_modules_as_themselves():
    calls = []
    layer = torch.nn.Linear(8, 4)
    layer.register_forward_hook(lambda module, args, out: calls.append("hook"))
    x = torch.randn(1, 8)
    torch.testing.assert_close(cpu_linear.project(layer, x), layer(x))
    assert calls == ["hook", "hook"]  # the hooked module ran as a module both times

    class Quantized(torch.nn.Linear):  # stands in for bitsandbytes' Linear4bit: a subclass with its own forward
        def forward(self, x):
            calls.append("own forward")
            return super().forward(x)

    cpu_linear.project(Quantized(8, 4), x)
    assert calls[-1] == "own forward"
