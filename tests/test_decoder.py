"""SpeculativeDecoder, greedy: token-identical to target.generate(do_sample=False) on tiny random Llamas."""
import copy
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import sdalign_rt as sd  # noqa: E402
from sdalign_rt.models.tiny import finish_random_model  # noqa: E402

VOCAB = 96
TREES = {
    "chain1": sd.TreeSpec.chain(1),
    "chain4": sd.TreeSpec.chain(4),
    "static": sd.TreeSpec.static([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0)]),
    "dynamic": sd.TreeSpec.dynamic(top_k=3, depth=4, total_tokens=10),
}


def tiny_llama(seed: int, hidden: int = 64, layers: int = 2, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation="eager")
    return finish_random_model(LlamaForCausalLM(config))


TARGET = tiny_llama(0)


def perturbed(model, scale: float, seed: int) -> LlamaForCausalLM:
    copy = tiny_llama(0)
    copy.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp(min=1e-3))
    return copy


DRAFTS = {"unrelated": tiny_llama(1, hidden=32), "identical": perturbed(TARGET, 0.0, 0),
          "perturbed": perturbed(TARGET, 0.3, 1)}


def left_padded_prompts(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[b, width - n:] = 1
    return ids, mask


def reference(ids, mask, max_new_tokens, eos=None):
    kwargs = {"eos_token_id": eos} if eos is not None else {}
    return TARGET.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


@settings(max_examples=30)
@given(draft=st.sampled_from(sorted(DRAFTS)), tree=st.sampled_from(sorted(TREES)),
       lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3), max_new=st.integers(1, 24),
       aligned=st.booleans(), lean=st.booleans(), seed=st.integers(0, 2**16))
def test_greedy_equals_target_generate(draft, tree, lengths, max_new, aligned, lean, seed):
    """Through the lean forward and through transformers' own (lean=False)."""
    ids, mask = left_padded_prompts(lengths, seed)
    drafter = DRAFTS[draft]
    adapter = None
    if aligned:  # identity at init; maps the drafter's hidden size onto the verifier's when they differ
        adapter = sd.BottleneckAdapter(drafter.config.hidden_size, 16, out_size=TARGET.config.hidden_size)
        torch.nn.init.normal_(adapter.up.weight, std=0.02)
    decoder = sd.SpeculativeDecoder(target=TARGET, draft=drafter, adapter=adapter, tree=TREES[tree], lean=lean)
    out = decoder.generate(ids, max_new, attention_mask=mask)
    assert torch.equal(out.sequences, reference(ids, mask, max_new))


@pytest.mark.parametrize("tree", ["chain1", "chain4", "static"])
@pytest.mark.parametrize("aligned", [False, True])
def test_identical_drafter_accepts_everything(tree, aligned):
    """Drafter == verifier (with an identity adapter when aligned): every draft is accepted, tau == depth + 1."""
    spec = TREES[tree]
    ids, mask = left_padded_prompts([5, 3], 0)
    adapter = sd.BottleneckAdapter(64, 16) if aligned else None
    max_new = 1 + 3 * (spec.depth + 1)  # the prefill token, then three full steps
    out = sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["identical"], adapter=adapter, tree=spec).generate(
        ids, max_new, attention_mask=mask)
    assert torch.equal(out.sequences, reference(ids, mask, max_new))
    assert out.stats["steps"] == 3
    assert out.stats["mean_accepted"] == spec.depth + 1 and out.stats["acceptance_rate"] == 1.0
    assert out.stats["per_position_acceptance"] == [1.0] * spec.depth


def test_unrelated_drafter_still_lossless_with_low_acceptance():
    ids, mask = left_padded_prompts([6, 6], 3)
    out = sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["unrelated"], tree=TREES["chain4"]).generate(
        ids, 30, attention_mask=mask)
    assert torch.equal(out.sequences, reference(ids, mask, 30))
    assert out.stats["acceptance_rate"] < 0.3


def test_eos_ends_rows_independently_like_generate():
    ids, mask = left_padded_prompts([4, 7, 2], 5)
    plain = reference(ids, mask, 25)
    eos = int(plain[0, ids.shape[1] + 5])  # a token the first row emits after a few steps
    expected = reference(ids, mask, 25, eos=eos)
    decoder = sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["perturbed"], tree=TREES["static"], eos_token_id=eos,
                                    pad_token_id=0)
    out = decoder.generate(ids, 25, attention_mask=mask)
    assert torch.equal(out.sequences, expected)


def test_streaming_callback_sees_every_token_once():
    ids, mask = left_padded_prompts([3, 5], 7)
    chunks = []
    out = sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["perturbed"], tree=TREES["chain4"]).generate(
        ids, 17, attention_mask=mask, callback=chunks.append)
    for b in range(2):
        streamed = [t for chunk in chunks for t in chunk[b]]
        assert streamed == out.sequences[b, ids.shape[1]:].tolist()


def test_errors():
    other_vocab = tiny_llama(2, vocab=VOCAB + 8)
    with pytest.raises(ValueError, match="vocab mismatch"):
        sd.SpeculativeDecoder(target=TARGET, draft=other_vocab)
    with pytest.raises(ValueError, match=r"adapter maps 64 -> 64, but the drafter's hidden size is 32"):
        sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["unrelated"], adapter=sd.BottleneckAdapter(64, 8))
    decoder = sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["perturbed"])
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="batch size mismatch"):
        decoder.generate(ids, 4, draft_input_ids=ids[:1])
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        decoder.generate(ids, 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["perturbed"], mode="fast")


def homogeneity_p_value(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample chi-square test of equal distributions; categories with < 10 draws in all are pooled."""
    counts = torch.stack([torch.bincount(a, minlength=VOCAB), torch.bincount(b, minlength=VOCAB)]).double()
    big = counts.sum(0) >= 10
    table = torch.cat([counts[:, big], counts[:, ~big].sum(1, keepdim=True)], dim=1)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    df = table.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("tree,warp,lean", [("chain4", dict(temperature=1.0), True),
                                            ("static", dict(temperature=0.7, top_k=20, top_p=0.9), True),
                                            ("dynamic", dict(temperature=0.8, top_k=30), False)])
def test_sample_mode_matches_target_sampling(tree, warp, lean):
    """Each of the first new tokens is distributed as in target.generate(do_sample=True): two-sample
    chi-square on 3000 rows each, fixed seeds, p > 1e-4 per position."""
    rows, new = 3000, 4
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(11)).expand(rows, -1)
    decoder = sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["perturbed"], mode="sample", tree=TREES[tree],
                                    lean=lean)
    out = decoder.generate(ids, new, generator=torch.Generator().manual_seed(1), **warp)
    ours = out.sequences[:, 6:]
    assert 0.02 < out.stats["acceptance_rate"] < 0.98  # both the accept and the reject branch are exercised
    torch.manual_seed(2)
    theirs = TARGET.generate(ids, max_new_tokens=new, do_sample=True, top_k=warp.get("top_k", 0),
                             top_p=warp.get("top_p", 1.0), temperature=warp["temperature"])[:, 6:]
    for position in range(new):
        p_value = homogeneity_p_value(ours[:, position], theirs[:, position])
        assert p_value > 1e-4, f"position {position}: p-value {p_value:.2e}"


def test_sample_mode_is_reproducible_with_a_generator():
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    decoder = sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["perturbed"], mode="sample", tree=TREES["static"])
    first = decoder.generate(ids, 12, generator=torch.Generator().manual_seed(5)).sequences
    second = decoder.generate(ids, 12, generator=torch.Generator().manual_seed(5)).sequences
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        decoder.generate(ids, 4, temperature=0.0)


@pytest.mark.parametrize("tree,lean", [("chain4", True), ("static", False), ("dynamic", True)])
def test_feature_mode_thresholds(tree, lean):
    """threshold > 1 accepts nothing (output = greedy verifier output); -1 accepts every draft (lossy, and
    the mismatches are reported)."""
    ids, mask = left_padded_prompts([5, 4], 9)
    expected = reference(ids, mask, 15)
    nothing = sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["perturbed"], mode="feature", tree=TREES[tree],
                                    feature_threshold=1.5, lean=lean).generate(ids, 15, attention_mask=mask)
    assert torch.equal(nothing.sequences, expected)
    assert nothing.stats["accepted"] == 0 and nothing.stats["feature_mismatches"] == 0
    everything = sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["unrelated"], mode="feature", tree=TREES[tree],
                                       adapter=sd.BottleneckAdapter(32, 8, out_size=64), feature_threshold=-1.0,
                                       lean=lean)
    out = everything.generate(ids, 16, attention_mask=mask)
    assert out.stats["per_position_acceptance"][0] == 1.0
    if tree != "dynamic":  # a static tree's deepest path has depth nodes
        assert out.stats["mean_accepted"] == TREES[tree].depth + 1
    assert out.stats["feature_mismatches"] > 0 and not torch.equal(out.sequences, reference(ids, mask, 16))


def test_feature_mode_with_identical_states_is_exact():
    """Drafter == verifier, identity adapter: states match (cosine 1), drafts are the verifier's argmax."""
    ids, mask = left_padded_prompts([6, 2], 4)
    out = sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["identical"], adapter=sd.BottleneckAdapter(64, 8),
                                mode="feature", tree=TREES["chain4"], feature_threshold=0.999).generate(
        ids, 16, attention_mask=mask)
    assert torch.equal(out.sequences, reference(ids, mask, 16))
    assert out.stats["acceptance_rate"] == 1.0 and out.stats["feature_mismatches"] == 0


def test_feature_mode_needs_matching_hidden_sizes_or_an_adapter():
    with pytest.raises(ValueError, match="feature mode compares hidden states"):
        sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["unrelated"], mode="feature")


def test_attention_mask_is_inferred_like_generate():
    """No attention_mask: pad tokens (declared pad id, not an EOS id) are masked as target.generate does."""
    ids, _ = left_padded_prompts([6, 2, 4], 8)  # left pads are token 0 == generation_config.pad_token_id
    expected = TARGET.generate(ids, max_new_tokens=12, do_sample=False)
    out = sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["perturbed"], tree=TREES["chain4"]).generate(ids, 12)
    assert torch.equal(out.sequences, expected)


def test_warns_about_generation_settings_it_does_not_apply():
    model = perturbed(TARGET, 0.0, 0)
    model.generation_config.repetition_penalty = 1.3
    with pytest.warns(UserWarning, match="sets repetition_penalty"):
        sd.SpeculativeDecoder(target=model, draft=DRAFTS["perturbed"])


def test_mixed_precision_pair_with_adapter():
    """A bf16 verifier with an fp32 drafter and adapter: drafting works and greedy output stays lossless."""
    target = perturbed(TARGET, 0.0, 0).to(torch.bfloat16)
    ids, mask = left_padded_prompts([5, 3], 12)
    expected = target.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    adapter = sd.BottleneckAdapter(32, 8, out_size=64)
    out = sd.SpeculativeDecoder(target=target, draft=DRAFTS["unrelated"], adapter=adapter,
                                tree=TREES["static"]).generate(ids, 10, attention_mask=mask)
    assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("tree", ["chain4", "dynamic"])
def test_every_backend_runs_the_loop(backend, tree):
    """The loop's ops (tree verification, KV compaction on the preallocated cache's sliced view, the fused
    adapter) forced onto each backend present: Triton under the interpreter, or on the GPU with the models there."""
    on_gpu = backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1"  # compiled Triton: CUDA tensors
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    target = copy.deepcopy(TARGET).to(device) if on_gpu else TARGET
    draft = copy.deepcopy(DRAFTS["perturbed"]).to(device) if on_gpu else DRAFTS["perturbed"]
    ids, mask = (t.to(device) for t in left_padded_prompts([4, 6], 13))
    adapter = sd.BottleneckAdapter(64, 16, device=device)
    torch.nn.init.normal_(adapter.up.weight, std=0.02)
    out = sd.SpeculativeDecoder(target=target, draft=draft, adapter=adapter, tree=TREES[tree]).generate(
        ids, 10, attention_mask=mask)
    assert torch.equal(out.sequences, target.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False))


@pytest.mark.parametrize("tree", ["chain4", "static", "dynamic"])
def test_reduced_draft_vocabulary(tree):
    """An adapter's draft_vocab: drafts are scored over those verifier tokens only. Holding every token the
    verifier emits, the identical drafter still accepts everything; holding none of them, nothing is
    accepted; greedy output is the verifier's either way."""
    ids, mask = left_padded_prompts([5, 3], 4)
    expected = reference(ids, mask, 13)
    emitted = expected[:, ids.shape[1]:].unique()
    others = torch.tensor([t for t in range(VOCAB) if t not in set(emitted.tolist())])
    rates = []
    for vocab in (torch.cat([emitted, others[:5]]), others):
        adapter = sd.BottleneckAdapter(64, 16, draft_vocab=vocab)
        out = sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["identical"], adapter=adapter,
                                    tree=TREES[tree]).generate(ids, 13, attention_mask=mask)
        assert torch.equal(out.sequences, expected)
        rates.append(out.stats["acceptance_rate"])
    assert rates == [1.0, 0.0]
