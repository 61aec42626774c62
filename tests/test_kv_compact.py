"""kv_compact: equality with the reference in every cache layout, and the slot invariants."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sdalign_rt as sd
from sdalign_rt import reference
from strategies import make_parents, paths_of, planted_tokens, trees

CACHE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def accepted_paths(parents: torch.Tensor, seed: int) -> torch.Tensor:
    """accept_nodes as verify_tree_greedy returns them for random tokens on these trees."""
    draft, argmax = planted_tokens(parents, 4, 0.8, seed)
    return reference.verify_tree_greedy(draft, parents, argmax)[0]


def make_cache(layers, batch, heads, slots, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, batch, heads, slots, head_dim, generator=gen).to(dtype)


def check_slots(before: torch.Tensor, after: torch.Tensor, accept_nodes, prefix, new_len):
    """Accepted node k's K/V now sits at prefix + k; every slot outside [prefix, new_len) is untouched."""
    for b in range(accept_nodes.shape[0]):
        nodes = [n for n in accept_nodes[b].tolist() if n >= 0]
        assert int(new_len[b]) == int(prefix[b]) + len(nodes)
        for k, node in enumerate(nodes):
            assert torch.equal(after[..., b, :, int(prefix[b]) + k, :], before[..., b, :, int(prefix[b]) + node, :])
        untouched = [s for s in range(before.shape[-2]) if not int(prefix[b]) <= s < int(new_len[b])]
        assert torch.equal(after[..., b, :, untouched, :], before[..., b, :, untouched, :])


@settings(max_examples=20)
@given(parents=trees(max_nodes=40, max_batch=3), layers=st.integers(1, 3), heads=st.integers(1, 3),
       head_dim=st.sampled_from([4, 16, 64, 128]), dtype=st.sampled_from(CACHE_DTYPES),
       layout=st.sampled_from(["stacked", "layer-views", "separate", "pairs"]), seed=st.integers(0, 2**16))
def test_matches_reference_in_every_layout(backend, device, parents, layers, heads, head_dim, dtype, layout, seed):
    batch, n = parents.shape
    accept_nodes = accepted_paths(parents, seed)
    prefix = torch.randint(0, 9, (batch,), generator=torch.Generator().manual_seed(seed))
    slots = int(prefix.max()) + n + 2
    original = make_cache(layers, batch, heads, slots, head_dim, dtype, seed)
    expected = original.clone()
    reference.kv_compact([expected], accept_nodes, prefix)

    cache = original.clone().to(device)
    if layout == "stacked":
        caches = cache
    elif layout == "layer-views":  # per-layer K and V views of one preallocated buffer
        caches = [cache[l, kv] for l in range(layers) for kv in range(2)]
    elif layout == "separate":
        separate = [cache[l, kv].clone() for l in range(layers) for kv in range(2)]
        caches = separate
    else:
        separate = [cache[l, kv].clone() for l in range(layers) for kv in range(2)]
        caches = [(separate[2 * l], separate[2 * l + 1]) for l in range(layers)]
    new_len = sd.ops.kv_compact(caches, accept_nodes.to(device), prefix.to(device))
    if layout in ("separate", "pairs"):
        cache = torch.stack(separate).view(cache.shape)
    assert torch.equal(cache.cpu(), expected)
    check_slots(original, cache.cpu(), accept_nodes, prefix, new_len.cpu())


@pytest.mark.parametrize("dtype", CACHE_DTYPES, ids=lambda d: str(d)[6:])
def test_7b_layout(backend, device, dtype):
    """32 layers x K/V, 32 heads of 128, a 64-node tree, batch 2: one launch on the stacked cache.

    The interpreter runs programs one by one in Python (4096 here take minutes), so there it keeps head_dim,
    tree and batch but only 4 layers and 2 heads: the per-program work is the same, only the count differs."""
    interpreted = backend == "triton" and device.type == "cpu"
    layers, heads = (4, 2) if interpreted else (32, 32)
    rng = np.random.default_rng(0)
    parents = torch.tensor([make_parents("bushy", 64, rng), make_parents("deep", 64, rng)])
    accept_nodes = accepted_paths(parents, 1)
    prefix = torch.tensor([10, 3])
    original = make_cache(layers, 2, heads, 80, 128, dtype, 2)
    cache = original.clone().to(device)
    new_len = sd.ops.kv_compact(cache, accept_nodes.to(device), prefix.to(device))
    check_slots(original, cache.cpu(), accept_nodes, prefix, new_len.cpu())


def test_non_viewable_layout_is_written_back(backend, device):
    """A permuted cache cannot be flattened as a view; the op must still update the caller's tensor."""
    accept_nodes = torch.tensor([[0, 1, 3]])
    base = make_cache(2, 1, 2, 8, 4, torch.float32, 0)
    cache = base.permute(1, 0, 2, 3, 4, 5).clone().permute(1, 0, 2, 3, 4, 5).to(device)  # K/V outermost
    expected = base.clone()
    reference.kv_compact([expected], accept_nodes, torch.tensor([2]))
    sd.ops.kv_compact(cache, accept_nodes.to(device), torch.tensor([2], device=device))
    assert torch.equal(cache.cpu(), expected)


def test_design_example(backend, device):
    """Accepted path 0 -> 2 -> 5 at prefix 3: slots 3, 5, 8 move to 3, 4, 5."""
    cache = torch.arange(12, dtype=torch.float32).view(1, 1, 12, 1).expand(1, 1, 12, 2).contiguous().to(device)
    new_len = sd.ops.kv_compact([cache], torch.tensor([[0, 2, 5, -1]], device=device), 3)
    assert new_len.tolist() == [6]
    assert cache[0, 0, :, 0].tolist() == [0, 1, 2, 3, 5, 8, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("call,message", [
    (lambda c, a: sd.ops.kv_compact(c, torch.tensor([[1, 2]]), 0), "start with the root node 0"),
    (lambda c, a: sd.ops.kv_compact(c, torch.tensor([[0, -1, 2]]), 0), "padded with -1 only after"),
    (lambda c, a: sd.ops.kv_compact(c, torch.tensor([[0, 2, 1]]), 0), "root-to-node path"),
    (lambda c, a: sd.ops.kv_compact(c, a, 7), "reach cache slot 9, but the caches hold 8 slots"),
    (lambda c, a: sd.ops.kv_compact(c, a.expand(2, -1), 0), "accept_nodes must have 1 rows"),
    (lambda c, a: sd.ops.kv_compact([c[0, 0], c[0, 0][..., :2]], a, 0), r"caches\[1\] has shape"),
    (lambda c, a: sd.ops.kv_compact(c[0, 0, 0], a, 0), r"caches\[0\] must have at least 4 dims"),
    (lambda c, a: sd.ops.kv_compact([], a, 0), "non-empty sequence"),
    (lambda c, a: sd.ops.kv_compact(c, a.float(), 0), "accept_nodes must have dtype"),
])
def test_bad_input(call, message):
    cache = make_cache(1, 1, 1, 8, 4, torch.float32, 0)
    with pytest.raises(ValueError, match=message):
        call(cache, torch.tensor([[0, 2]]))


def test_strided_head_dim(backend, device):
    """A cache whose head_dim is not contiguous (every other element of a wider buffer)."""
    accept_nodes = torch.tensor([[0, 2, 3], [0, 1, -1]])
    base = make_cache(2, 2, 2, 9, 4, torch.float32, 5)
    wide = torch.zeros(*base.shape[:-1], 8)
    wide[..., ::2] = base
    cache = wide.to(device)[..., ::2]
    expected = base.clone()
    reference.kv_compact([expected], accept_nodes, torch.tensor([1, 4]))
    new_len = sd.ops.kv_compact(cache, accept_nodes.to(device), torch.tensor([1, 4], device=device))
    assert torch.equal(cache.cpu(), expected) and new_len.tolist() == [4, 6]


class _Layer:
    def __init__(self, keys, values):
        self.keys, self.values = keys, values


class _LayeredCache:  # the shape of transformers 5's DynamicCache: .layers[i].keys / .values
    def __init__(self, tensors):
        self.layers = [_Layer(tensors[2 * i], tensors[2 * i + 1]) for i in range(len(tensors) // 2)]


class _LegacyCache:  # transformers 4.x: .key_cache / .value_cache lists
    def __init__(self, tensors):
        self.key_cache, self.value_cache = tensors[0::2], tensors[1::2]


@pytest.mark.parametrize("cache_type", [_LayeredCache, _LegacyCache])
def test_transformers_cache_objects(backend, device, cache_type):
    accept_nodes = torch.tensor([[0, 1, 3], [0, 2, -1]])
    original = make_cache(3, 2, 2, 7, 8, torch.float32, 9)
    expected = original.clone()
    reference.kv_compact([expected], accept_nodes, torch.tensor([2, 0]))
    tensors = [original[l, kv].clone().to(device) for l in range(3) for kv in range(2)]
    new_len = sd.ops.kv_compact(cache_type(tensors), accept_nodes.to(device), torch.tensor([2, 0], device=device))
    assert torch.equal(torch.stack(tensors).cpu().view(original.shape), expected)
    assert new_len.tolist() == [5, 2]


def test_unknown_cache_object_is_rejected():
    with pytest.raises(ValueError, match="or a transformers cache; got object"):
        sd.ops.kv_compact(object(), torch.tensor([[0]]), 0)
