"""The lean step: one host read-back per step, fixed forward widths, a drafter that never re-reads, caches that
equal a plain prefill of the committed tokens, the transformers fallback, and the refusals around them."""
import copy
import os

import pytest
import torch
from torch.overrides import TorchFunctionMode

pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

import sdalign_rt as sd  # noqa: E402
from conftest import DEVICE  # noqa: E402
from sdalign_rt import _ext  # noqa: E402
from sdalign_rt.decode_step import feature_path  # noqa: E402
from sdalign_rt.model_runner import ModelRunner, new_cache  # noqa: E402
from sdalign_rt.models.tiny import finish_random_model  # noqa: E402
from sdalign_rt.tree_plan import TreePlan  # noqa: E402
from test_decoder import DRAFTS, TARGET, TREES, VOCAB, left_padded_prompts, reference, tiny_llama  # noqa: E402

# Tensor calls that wait for the device on CUDA (read a value back to the host). `.to(device)` is left out:
# on this CPU-only machine every device is the host, so a transfer between devices cannot be told apart.
SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
           "unique", "masked_select", "__len__", "__iter__", "any", "all"}


class SyncCounter(TorchFunctionMode):
    """Counts syncing calls (and boolean-mask indexing, which calls nonzero) made through torch."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING and name not in ("any", "all"):
            self.calls.append(name)
        elif name == "__getitem__" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                           for i in (args[1] if isinstance(args[1], tuple) else (args[1],))):
            self.calls.append("bool-index")
        return func(*args, **(kwargs or {}))


def count_syncs(decoder, ids, mask, new):
    with SyncCounter() as counter:
        out = decoder.generate(ids, new, attention_mask=mask)
    return counter.calls, out


def sync_free_backend(device: torch.device):
    """The backend whose tree ops read nothing back: Triton on a GPU (or under the interpreter), else C++. The
    reference ops are plain Python over tensors and read values back on purpose (CPU tensors: no device)."""
    if device.type == "cuda":
        return "triton"
    if _ext.cpp_available():
        return "cpp"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    pytest.skip("no sync-free backend here (no GPU, no C++ extension, no Triton interpreter)")


@pytest.mark.parametrize("tree", ["static", "dynamic"])
@pytest.mark.parametrize("shared", [False, True])
def test_one_host_sync_per_step(tree, shared):
    """Two runs that differ only in length: every extra step adds exactly one syncing call (the read-back).
    On a GPU the models and inputs live on it, so these are real device syncs."""
    backend = sync_free_backend(DEVICE)
    target = copy.deepcopy(TARGET).to(DEVICE) if DEVICE.type == "cuda" else TARGET
    draft = target if shared else copy.deepcopy(DRAFTS["perturbed"]).to(DEVICE)
    adapter = sd.BottleneckAdapter(64, 16, device=DEVICE)
    decoder = sd.SpeculativeDecoder(target=target, draft=draft, adapter=adapter, tree=TREES[tree],
                                    draft_layers=1 if shared else None)
    ids, mask = (t.to(DEVICE) for t in left_padded_prompts([5, 3], 4))
    with sd.ops.use_backend(backend):
        decoder.generate(ids, 4, attention_mask=mask)  # plans the tree and allocates caches: once per decoder
        short_calls, short = count_syncs(decoder, ids, mask, 5)
        long_calls, long = count_syncs(decoder, ids, mask, 20)
    steps = long.stats["steps"] - short.stats["steps"]
    assert steps >= 3
    assert len(long_calls) - len(short_calls) == steps, (short_calls, long_calls)
    assert len(short_calls) <= short.stats["steps"] + 8  # the prefill's few (mask checks, first token) included
    # Lossless against the verifier's own greedy decode on the same device.
    assert torch.equal(long.sequences, target.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False))


class ForwardLog:
    """Records each ModelRunner.forward call as (runner, width)."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = ModelRunner.forward

        def logged(runner, embeds, *args, **kwargs):
            self.calls.append((runner, embeds.shape[1]))
            return original(runner, embeds, *args, **kwargs)

        monkeypatch.setattr(ModelRunner, "forward", logged)


@pytest.mark.parametrize("tree", ["chain4", "static", "dynamic"])
@pytest.mark.parametrize("shared", [False, True])
def test_forwards_per_step_have_fixed_widths_and_no_rereads(monkeypatch, tree, shared):
    """Per step: `depth` drafter forwards (the root, then every level but the last) and one verifier forward;
    the root forward is [root] (shared cache) or [previous, root]: accepted drafts are never re-read. (Prefills
    run the forward directly and are not counted here.)"""
    spec = TREES[tree]
    log = ForwardLog(monkeypatch)
    decoder = sd.SpeculativeDecoder(target=TARGET, draft=TARGET if shared else DRAFTS["perturbed"], tree=spec,
                                    draft_layers=1 if shared else None)
    ids, mask = left_padded_prompts([6, 4], 5)
    out = decoder.generate(ids, 25, attention_mask=mask)
    assert torch.equal(out.sequences, reference(ids, mask, 25))
    verifier = decoder.idle_workspaces()[0].verifier
    steps = out.stats["steps"]
    verify_widths = [w for r, w in log.calls if r is verifier]
    draft_widths = [w for r, w in log.calls if r is not verifier]
    if shared and spec.is_static:  # layer reuse: the leaves' first layer, then every node from layer 1 on
        leaves = TreePlan.build(spec, "cpu", torch.float32, 2).leaves
        assert decoder.reuse_layers and verify_widths == [len(leaves), spec.num_nodes] * steps
    else:
        assert verify_widths == [spec.num_nodes] * steps
    if spec.is_static:
        plan = TreePlan.build(spec, "cpu", torch.float32, 2)
        levels = [len(plan.expanded[d]) for d in range(1, spec.depth)]  # only nodes with children run
    else:
        levels = [spec.top_k] * (spec.depth - 1)
    assert draft_widths == ([1 if shared else 2] + levels) * steps


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("tree", ["chain4", "static", "dynamic"])
def test_caches_equal_a_plain_prefill_of_the_committed_tokens(lean, tree):
    """After decoding, both caches hold, slot for slot, the K/V a fresh prefill of the committed text gives:
    compaction kept the accepted nodes, the drafter kept (or recomputed) what it had drafted."""
    decoder = sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["perturbed"], tree=TREES[tree], lean=lean)
    ids, mask = left_padded_prompts([6, 3], 6)
    out = decoder.generate(ids, 21, attention_mask=mask)
    workspace = decoder.idle_workspaces()[0]
    committed = out.sequences[:, :-1]  # every token but the last bonus has its K/V cached
    committed_mask = torch.cat([mask, torch.ones(2, 20, dtype=mask.dtype)], 1)
    for runner, model in ((workspace.verifier, TARGET), (workspace.drafter, DRAFTS["perturbed"])):
        fresh = ModelRunner(model, new_cache(model, 2, committed.shape[1] + 2), lean=lean)
        fresh.prefill(committed, committed_mask)
        width = committed.shape[1]
        for b in range(2):
            start = int(fresh.cache.starts[b])
            assert int(runner.cache.starts[b]) == start and int(runner.cache.lengths[b]) >= width
            # The drafter's last committed token may still wait for the next step's recompute.
            width_b = width - 1 if runner is workspace.drafter else width
            torch.testing.assert_close(runner.cache.buffers[0][..., b, :, start:width_b, :],
                                       fresh.cache.buffers[0][..., b, :, start:width_b, :], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lean", [True, False])
def test_lossless_through_both_paths(lean):
    for tree in ("chain4", "static", "dynamic"):
        for draft in ("perturbed", "unrelated"):
            ids, mask = left_padded_prompts([7, 2, 5], 8)
            adapter = None if draft == "perturbed" else sd.BottleneckAdapter(32, 8, out_size=64)
            out = sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS[draft], adapter=adapter, tree=TREES[tree],
                                        lean=lean).generate(ids, 17, attention_mask=mask)
            assert torch.equal(out.sequences, reference(ids, mask, 17)), (tree, draft)
            assert out.stats["forward_path"] == ("lean" if lean else "transformers")


def tiny_gpt2(seed, positions=64):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=positions,
                        attn_implementation="eager")
    return finish_random_model(GPT2LMHeadModel(config))


def tiny_neox(seed):
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=128, attn_implementation="sdpa")
    return finish_random_model(GPTNeoXForCausalLM(config))


def assert_lossless_with_both_drafters(target, draft, tree: str, forward_path: str) -> None:
    """A separate drafter and the target's own first layer each decode exactly the target's greedy output."""
    ids, mask = left_padded_prompts([5, 8], 9)
    expected = target.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False)
    for drafter, layers in ((draft, None), (target, 1)):
        out = sd.SpeculativeDecoder(target=target, draft=drafter, tree=TREES[tree], draft_layers=layers).generate(
            ids, 14, attention_mask=mask)
        assert out.stats["forward_path"] == forward_path
        assert torch.equal(out.sequences, expected), (type(target).__name__, layers)


@pytest.mark.parametrize("tree", ["chain4", "static", "dynamic"])
def test_other_architectures_use_the_transformers_forward(tree):
    """GPT-2 (learned positions) verifies drafts of GPT-NeoX (rotary) and of its own first layer: lossless."""
    target, draft = tiny_gpt2(0), tiny_neox(1)
    assert_lossless_with_both_drafters(target, draft, tree, "transformers")
    with pytest.raises(ValueError, match="has no lean forward"):
        sd.SpeculativeDecoder(target=target, draft=draft, lean=True)


def test_attention_that_ignores_masks_is_refused():
    model = tiny_gpt2(2)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="ignores a custom attention mask"):
        sd.SpeculativeDecoder(target=model, draft=DRAFTS["perturbed"])
    llama = tiny_llama(0)
    llama.config._attn_implementation = "flash_attention_2"
    sd.SpeculativeDecoder(target=llama, draft=DRAFTS["perturbed"])  # the lean forward brings its own attention
    with pytest.raises(ValueError, match="flash_attention_2"):
        sd.SpeculativeDecoder(target=llama, draft=DRAFTS["perturbed"], lean=False)


def tiny_family(family: str, seed: int, window: int | None = None):
    """A tiny random Qwen2 (q/k/v biases), Qwen3 (q/k norms) or Mistral (grouped-query heads)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "mistral":
        config = transformers.MistralConfig(sliding_window=window, **common)
        model = transformers.MistralForCausalLM(config)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.Qwen3Config(head_dim=32, **common)
        model = transformers.Qwen3ForCausalLM(config)
    return finish_random_model(model)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("tree", ["chain4", "static", "dynamic"])
def test_llama_shaped_families_run_the_lean_forward(family, tree):
    """Qwen2 / Qwen3 / Mistral decoders run the lean forward, lossless with a separate drafter of the same family
    and drafting from their own first layer; their q/k/v biases and q/k norms are what make a copy wrong."""
    target, draft = tiny_family(family, 0), tiny_family(family, 1)
    if family == "qwen2":
        assert target.model.layers[0].self_attn.q_proj.bias is not None
    assert_lossless_with_both_drafters(target, draft, tree, "lean")


def test_sliding_windows_are_refused_where_they_would_bite():
    """Mistral's window: decoding that stays inside it runs (the window never masks anything); prompt + new tokens
    past it is refused, as is the transformers forward, which would drop the tree mask's window rule."""
    model = tiny_family("mistral", 0, window=24)
    ids = torch.randint(1, VOCAB, (1, 6))
    decoder = sd.SpeculativeDecoder(target=model, draft=model, draft_layers=1, tree=TREES["chain4"])
    out = decoder.generate(ids, 10)
    assert torch.equal(out.sequences, model.generate(ids, max_new_tokens=10, do_sample=False))
    with pytest.raises(ValueError, match="sliding-window attention .sliding_window=24.* 30 positions"):
        decoder.generate(ids, 20)
    with pytest.raises(ValueError, match="sliding-window attention"):
        sd.SpeculativeDecoder(target=model, draft=DRAFTS["perturbed"], lean=False)


def test_bad_inputs_are_refused():
    decoder = sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["perturbed"])
    ids = torch.randint(1, VOCAB, (2, 6))
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"batch rows \[0\] are right-padded .* pad on the left"):
        decoder.generate(ids, 4, attention_mask=right)
    empty = torch.tensor([[0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"batch rows \[0\] hold no token"):
        decoder.generate(ids, 4, attention_mask=empty)
    short = tiny_gpt2(3, positions=16)
    with pytest.raises(ValueError, match="exceed the verifier's max_position_embeddings .16.: its learned position"):
        sd.SpeculativeDecoder(target=short, draft=short, draft_layers=1).generate(ids, 11)
    rotary = tiny_llama(0)
    rotary.config.max_position_embeddings = 12
    with pytest.warns(UserWarning, match="exceed the verifier's max_position_embeddings"):
        out = sd.SpeculativeDecoder(target=rotary, draft=DRAFTS["perturbed"]).generate(ids, 11)
    assert torch.equal(out.sequences, rotary.generate(ids, max_new_tokens=11, do_sample=False))


def test_nonfinite_logits_raise_naming_the_step():
    model = tiny_llama(0)

    def poison(module, args, output):  # the tree forwards ([B, N, V]) turn nan, the prefill's [B, V] does not
        return output.fill_(float("nan")) if output.dim() == 3 else output

    model.lm_head.register_forward_hook(poison)
    decoder = sd.SpeculativeDecoder(target=model, draft=DRAFTS["perturbed"], tree=TREES["chain4"])
    with pytest.raises(FloatingPointError, match=r"non-finite .* in step 1, batch rows \[0, 1\]"):
        decoder.generate(torch.randint(1, VOCAB, (2, 4)), 8)
    model.lm_head.register_forward_hook(lambda module, args, output: output.fill_(float("inf")))
    with pytest.raises(FloatingPointError, match="in the prefill"):
        decoder.generate(torch.randint(1, VOCAB, (2, 1)), 8)


def test_feature_rule_accepts_top_ranked_children_only():
    """parents [-1, 0, 0, 2]: node 2 is the root's second choice, node 3 its child. With every state close,
    the deeper path [0, 2, 3] is not accepted: closeness at the root only vouches for the root's top child."""
    parents = torch.tensor([[-1, 0, 0, 2]])
    ranks = torch.tensor([[-1, 0, 1, 0]])
    close = torch.ones(1, 4, dtype=torch.bool)
    nodes, length = feature_path(close, parents, ranks, 2)
    assert nodes.tolist() == [[0, 1, -1]] and length.tolist() == [2]
    far_root = torch.tensor([[False, True, True, True]])
    nodes, length = feature_path(far_root, parents, ranks, 2)
    assert nodes.tolist() == [[0, -1, -1]] and length.tolist() == [1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_layers_on_two_gpus():
    """The decoder layers split over two GPUs (as accelerate's device_map does): lossless, one cache buffer each."""
    model = tiny_llama(0, layers=4)
    model.model.embed_tokens.to("cuda:0")
    for i, layer in enumerate(model.model.layers):
        layer.to("cuda:0" if i < 2 else "cuda:1")
    model.model.norm.to("cuda:1")
    model.model.rotary_emb.to("cuda:0")
    model.lm_head.to("cuda:1")
    reference_model = tiny_llama(0, layers=4).to("cuda:0")
    ids = torch.randint(1, VOCAB, (2, 6), device="cuda:0")
    expected = reference_model.generate(ids, max_new_tokens=12, do_sample=False)
    decoder = sd.SpeculativeDecoder(target=model, draft=model, draft_layers=1, tree=TREES["static"])
    out = decoder.generate(ids, 12)
    assert len(decoder.idle_workspaces()[0].verifier.cache.buffers) == 2
    assert torch.equal(out.sequences.cpu(), expected.cpu())


def test_compiled_forwards_decode_the_same(monkeypatch):
    """compile=True (torch.compile of the forwards; CUDA graphs on a GPU): the same output."""
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")
    ids, mask = left_padded_prompts([4, 6], 10)
    decoder = sd.SpeculativeDecoder(target=TARGET, draft=TARGET, draft_layers=1, tree=TREES["chain1"], compile=True)
    assert torch.equal(decoder.generate(ids, 6, attention_mask=mask).sequences, reference(ids, mask, 6))


@pytest.mark.parametrize("lean", [True, False])
def test_plain_one_token_decoding_through_the_runtime(lean):
    """draft=None: one verifier forward per token through the same loop (the baseline speculation must beat)."""
    ids, mask = left_padded_prompts([6, 2, 4], 11)
    out = sd.SpeculativeDecoder(target=TARGET, draft=None, lean=lean).generate(ids, 15, attention_mask=mask)
    assert torch.equal(out.sequences, reference(ids, mask, 15))
    assert out.stats["mean_accepted"] == 1.0 and out.stats["steps"] == 14
    with pytest.raises(ValueError, match="draft=None decodes one token per step"):
        sd.SpeculativeDecoder(target=TARGET, draft=None, tree=TREES["chain4"])


@pytest.mark.parametrize("tree", ["chain4", "static", "dynamic"])
def test_capacity_holds_rows_that_finish_first(monkeypatch, tree):
    """Caches sized exactly (no rounding up): rows accept at different rates, so one reaches max_new_tokens (its last
    step accepting past it) or an EOS while others decode on, and keeps writing tree regions at its frozen length."""
    monkeypatch.setattr("sdalign_rt.workspace.round_up", lambda slots: slots)
    ids, mask = left_padded_prompts([3, 6, 5], 12)
    for max_new in range(4, 16):
        expected = reference(ids, mask, max_new)
        for drafter, layers in ((DRAFTS["perturbed"], None), (TARGET, 1)):
            decoder = sd.SpeculativeDecoder(target=TARGET, draft=drafter, tree=TREES[tree], draft_layers=layers)
            assert torch.equal(decoder.generate(ids, max_new, attention_mask=mask).sequences, expected), max_new
