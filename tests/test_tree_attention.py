"""tree_attention: the kernel against the reference (random trees over left-padded committed ranges, grouped-query
heads, every dtype, 7B dims), the mask rule on a literal case, and the lean forward that uses it."""
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sdalign_rt as sd
from conftest import DEVICE
from sdalign_rt import reference
from strategies import make_parents

TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
             torch.float16: dict(rtol=5e-3, atol=5e-3)}


def tree_block(parents: list[int]) -> torch.Tensor:
    """[N, N] bool: node i sees itself and its ancestors."""
    n = len(parents)
    visible = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        visible[i] |= visible[parents[i]]
    return visible


def case(batch, heads, kv_heads, nodes, head_dim, capacity, dtype, seed, shared_block=True):
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, nodes, head_dim, generator=gen).to(dtype)
    keys = torch.randn(batch, kv_heads, capacity, head_dim, generator=gen).to(dtype)
    values = torch.randn(batch, kv_heads, capacity, head_dim, generator=gen).to(dtype)
    lengths = torch.tensor(rng.integers(1, capacity - nodes, batch), dtype=torch.int64)
    starts = torch.tensor([int(rng.integers(0, int(n))) for n in lengths], dtype=torch.int64)
    rows = 1 if shared_block else batch
    block = torch.stack([tree_block(make_parents("random", nodes, rng)) for _ in range(rows)])
    return q, keys, values, starts, lengths, block, lengths.clone()


def test_mask_rule_on_a_literal_case():
    """Slots 0-1 padding, 2-4 committed, the tree (root, child) at 5-6: the child sees 2-6, the root 2-5."""
    visible = reference.cache_visibility(torch.tensor([2]), torch.tensor([5]),
                                         torch.tensor([[[True, False], [True, True]]]), torch.tensor([5]), 8)
    assert visible.int().tolist() == [[[0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 0]]]


@settings(max_examples=12)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 2), group=st.sampled_from([1, 3]),
       nodes=st.integers(1, 12), head_dim=st.sampled_from([16, 24, 64]), capacity=st.integers(16, 200),
       dtype=st.sampled_from(list(TOLERANCE)), shared=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_reference(backend, device, batch, kv_heads, group, nodes, head_dim, capacity, dtype, shared, seed):
    inputs = case(batch, kv_heads * group, kv_heads, nodes, head_dim, max(capacity, nodes + 2), dtype, seed, shared)
    expected = reference.tree_attention(*inputs, scale=head_dim ** -0.5)
    out = sd.ops.tree_attention(*(t.to(device) for t in inputs))
    torch.testing.assert_close(out.cpu().float(), expected.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("nodes", [1, 5, 64])
def test_7b_dims(backend, device, nodes):
    """Vicuna-7B's attention (32 heads of 128), bf16, a 630-token context in a 768-slot cache."""
    inputs = case(1, 32, 32, nodes, 128, 768, torch.bfloat16, 0)
    inputs[4].fill_(630)  # lengths
    inputs[6].fill_(630)  # offset: the tree region follows the committed tokens
    expected = reference.tree_attention(*inputs, scale=128 ** -0.5)
    out = sd.ops.tree_attention(*(t.to(device) for t in inputs))
    torch.testing.assert_close(out.cpu().float(), expected.float(), **TOLERANCE[torch.bfloat16])


def test_slots_outside_the_row_are_never_read(device):
    """Garbage (nan) in every slot a row does not use changes nothing: the kernel never reads it."""
    q, keys, values, starts, lengths, block, offset = case(2, 4, 2, 3, 16, 64, torch.float32, 1)
    clean = sd.ops.tree_attention(q, keys, values, starts, lengths, block, offset)
    dirty_k, dirty_v = keys.clone(), values.clone()
    for b in range(2):
        used = set(range(int(starts[b]), int(lengths[b]) + 3))
        unused = [s for s in range(64) if s not in used]
        dirty_k[b, :, unused] = float("nan")
        dirty_v[b, :, unused] = float("nan")
    if device.type == "cuda" or sd.ops.get_backend() == "triton":
        out = sd.ops.tree_attention(*(t.to(device) for t in (q, dirty_k, dirty_v, starts, lengths, block, offset)))
        torch.testing.assert_close(out.cpu(), clean)


def test_bad_inputs_are_refused():
    q, keys, values, starts, lengths, block, offset = case(1, 4, 2, 3, 16, 32, torch.float32, 0)
    with pytest.raises(ValueError, match="not a multiple"):
        sd.ops.tree_attention(q[:, :3], keys, values, starts, lengths, block, offset)
    with pytest.raises(ValueError, match="block must be"):
        sd.ops.tree_attention(q, keys, values, starts, lengths, block[:, :2], offset)
    with pytest.raises(ValueError, match="lengths"):
        sd.ops.tree_attention(q, keys, values, starts, lengths.int(), block, offset)


@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_lean_forward_through_the_kernel_is_lossless(monkeypatch, tree):
    """SDALIGN_RT_ATTENTION=kernel: every decode-width attention of both models runs tree_attention (the Triton
    kernel under the interpreter, or on the GPU): the output is the verifier's greedy decode."""
    if sd.ops.triton_available() is False or "triton" not in sd.ops.available_backends(DEVICE):
        pytest.skip("no Triton backend here")
    from test_decoder import DRAFTS, TARGET, TREES, left_padded_prompts, reference as greedy

    monkeypatch.setenv("SDALIGN_RT_ATTENTION", "kernel")
    calls = []
    original = sd.ops.tree_attention
    monkeypatch.setattr(sd.ops, "tree_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids, mask = left_padded_prompts([5, 3], 4)
    with sd.ops.use_backend("triton"):
        out = sd.SpeculativeDecoder(target=TARGET.to(DEVICE), draft=DRAFTS["perturbed"].to(DEVICE),
                                    tree=TREES[tree]).generate(ids.to(DEVICE), 6, attention_mask=mask.to(DEVICE))
    assert calls and torch.equal(out.sequences.cpu(), greedy(ids, mask, 6))


def test_kernels_compile_for_hopper():
    """The interpreter runs a kernel as Python, so it cannot catch what only the compiler refuses (a plain global
    read inside @triton.jit did exactly that). Compile both kernels for sm_90 here, without a GPU."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sdalign_rt.kernels import tree_attention as ta
target = GPUTarget("cuda", 90, 32)
merge = {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "out_ptr": "*bf16", "SPLITS": "i32", "Dh": "i32",
         "BLOCK_SPLIT": "constexpr", "BLOCK_D": "constexpr"}
triton.compile(ASTSource(fn=ta._merge_kernel, signature=merge, constexprs={"BLOCK_SPLIT": 4, "BLOCK_D": 128}),
               target=target)
names = ["q_ptr", "k_ptr", "v_ptr", "start_ptr", "length_ptr", "offset_ptr", "block_ptr", "m_ptr", "l_ptr", "acc_ptr",
         "H_KV", "T", "W", "G", "Dh", "SPLITS", "scale", "sq_b", "sq_h", "sq_t", "sq_d", "sk_b", "sk_h", "sk_s", "sk_d",
         "sv_b", "sv_h", "sv_s", "sv_d", "sblk_b", "sblk_t", "sblk_w", "BLOCK_Q", "BLOCK_S", "BLOCK_D", "PRECISION",
         "UPCAST"]
types = ["*bf16"] * 3 + ["*i64"] * 3 + ["*u8"] + ["*fp32"] * 3 + ["i32"] * 6 + ["fp32"] + ["i32"] * 15 + ["constexpr"] * 5
constexprs = {"BLOCK_Q": 16, "BLOCK_S": 64, "BLOCK_D": 128, "PRECISION": "tf32", "UPCAST": False}
triton.compile(ASTSource(fn=ta._partial_kernel, signature=dict(zip(names, types)), constexprs=constexprs),
               target=target)
print("compiled")
'''
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0 and ("ptxas" in out.stderr or "No module named 'triton.backends" in out.stderr):
        pytest.skip(f"this triton cannot compile for CUDA here: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
