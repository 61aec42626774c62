"""Context-conditioned adapters (EAGLE-style feature fusion): the adapter also reads the verifier's final state
at the previous position. Extraction stores it, training uses it, decoding feeds it (the true state at the root,
the adapter's own prediction deeper in the tree), and greedy decoding stays lossless."""
import pytest
import torch

pytest.importorskip("transformers")

import sdalign_rt as sd  # noqa: E402
from sdalign_rt import train_adapter as ta  # noqa: E402
from sdalign_rt.extract import ExtractSample, extract_pairs, load_pairs  # noqa: E402
from test_decoder import DRAFTS, TARGET, TREES, VOCAB, left_padded_prompts, reference  # noqa: E402


def test_module_contract(tmp_path):
    adapter = sd.BottleneckAdapter(16, 4, out_size=12, context_size=12)
    torch.nn.init.normal_(adapter.up.weight)
    x, c = torch.randn(3, 16), torch.randn(3, 12)
    with pytest.raises(ValueError, match="conditioned on the verifier's previous state: pass context"):
        adapter(x)
    with pytest.raises(ValueError, match="takes no context"):
        sd.BottleneckAdapter(16, 4)(x, c)
    unconditioned = sd.BottleneckAdapter(16, 4, out_size=12)
    unconditioned.load_state_dict({k: v for k, v in adapter.state_dict().items() if not k.startswith("context")})
    torch.testing.assert_close(adapter(x, c), unconditioned(x))  # the context weights start at zero
    torch.nn.init.normal_(adapter.context.weight)
    assert not torch.allclose(adapter(x, c), unconditioned(x))
    adapter.save_pretrained(str(tmp_path))
    loaded = sd.BottleneckAdapter.from_pretrained(str(tmp_path))
    assert loaded.context_size == 12
    torch.testing.assert_close(loaded(x, c), adapter(x, c))


def test_extracted_context_is_the_previous_verifier_state(tmp_path):
    gen = torch.Generator().manual_seed(0)
    samples = [ExtractSample(id=f"s{i}", input_ids=torch.randint(1, VOCAB, (1, 1 + 3 * i), generator=gen))
               for i in range(2)]
    extract_pairs(DRAFTS["perturbed"], TARGET, samples, str(tmp_path), max_new_tokens=5, dtype=torch.float32,
                  progress=False)
    rows = load_pairs(str(tmp_path))
    first = rows["sample"] == 0
    # Within a sample, row j's context is row j - 1's target; a one-token prompt has zeros before it.
    torch.testing.assert_close(rows["context_hidden"][first][1:], rows["target_hidden"][first][:-1])
    assert not rows["context_hidden"][first][0].any()
    second = rows["sample"] == 1
    with torch.no_grad():
        full = TARGET(samples[1].input_ids, output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(rows["context_hidden"][second][0], full[-2])


def test_training_with_context_learns_from_it():
    """Rows whose target is a function of the context alone: a context adapter fits them, a plain one cannot."""
    gen = torch.Generator().manual_seed(1)
    draft, context = torch.randn(600, 16, generator=gen), torch.randn(600, 12, generator=gen)
    mix = torch.randn(12, 12, generator=gen) / 4
    rows = {"draft_hidden": draft, "context_hidden": context, "target_hidden": context @ mix,
            "next_token": torch.zeros(600, dtype=torch.long)}
    losses = {}
    for use in (False, True):
        config = ta.TrainConfig(bottleneck=32, epochs=40, lr=3e-3, batch_size=32, context=use, seed=0)
        _, log = ta.train_adapter(rows, config, progress=False)
        losses[use] = log["best_val_loss"]
    assert losses[True] < 0.5 * losses[False]
    rows["sample"] = torch.arange(600) // 10  # 60 "samples" of 10 consecutive rows
    _, log = ta.train_adapter(rows, ta.TrainConfig(bottleneck=32, epochs=10, lr=3e-3, batch_size=32, context=True,
                                                   self_context=0.5),
                              progress=False)
    assert log["best_val_loss"] < log["initial_val_loss"]
    with pytest.raises(ValueError, match="self_context needs the rows' sample numbers"):
        ta.train_adapter({k: v for k, v in rows.items() if k != "sample"},
                         ta.TrainConfig(context=True, self_context=0.5), progress=False)
    with pytest.raises(ValueError, match="needs the rows' context_hidden"):
        ta.train_adapter({k: v for k, v in rows.items() if k != "context_hidden"}, ta.TrainConfig(context=True),
                         progress=False)


@pytest.mark.parametrize("tree", ["chain4", "static", "dynamic"])
@pytest.mark.parametrize("shared", [False, True])
def test_decoding_with_a_context_adapter_is_lossless(tree, shared):
    """The drafter reads the verifier's state at the last accepted node (the prefill's last state first); a
    random context weight changes the drafts, never the output."""
    draft = TARGET if shared else DRAFTS["unrelated"]
    adapter = sd.BottleneckAdapter(draft.config.hidden_size, 8, out_size=64, context_size=64)
    torch.nn.init.normal_(adapter.context.weight, std=0.05)
    ids, mask = left_padded_prompts([5, 3], 7)
    out = sd.SpeculativeDecoder(target=TARGET, draft=draft, adapter=adapter, tree=TREES[tree],
                                draft_layers=1 if shared else None).generate(ids, 14, attention_mask=mask)
    assert torch.equal(out.sequences, reference(ids, mask, 14))


def test_identity_context_adapter_on_the_verifier_itself_accepts_everything():
    """Drafter = verifier with an identity adapter that ignores its context: every draft accepted; the stats count
    every accepted draft at rank 0."""
    adapter = sd.BottleneckAdapter(64, 8, context_size=64)
    ids, mask = left_padded_prompts([4, 6], 3)
    out = sd.SpeculativeDecoder(target=TARGET, draft=DRAFTS["identical"], adapter=adapter,
                                tree=TREES["chain4"]).generate(ids, 11, attention_mask=mask)
    assert torch.equal(out.sequences, reference(ids, mask, 11))
    assert out.stats["acceptance_rate"] == 1.0
    assert out.stats["accepted_by_depth_rank"] == [{"0": out.stats["row_steps"]}] * 4


def sequence_rows(samples=60, length=12, size=12, seed=5, rank=8):
    """Texts whose verifier state is the drafter's plus a rank-8 function of it and of the previous state (the
    context): more than a rank-4 adapter fits, so its errors carry down a chain of its own contexts."""
    gen = torch.Generator().manual_seed(100)
    w1, c = torch.randn(size, rank, generator=gen) / size ** 0.5, torch.randn(size, rank, generator=gen) / size ** 0.5 * 2
    w2 = torch.randn(rank, size, generator=gen)
    gen = torch.Generator().manual_seed(seed)
    draft = torch.randn(samples, length, size, generator=gen)
    target = torch.zeros(samples, length, size)
    state = torch.zeros(samples, size)
    for t in range(length):
        state = draft[:, t] + torch.tanh(draft[:, t] @ w1 + state @ c) @ w2
        target[:, t] = state
    context = torch.cat([torch.zeros(samples, 1, size), target[:, :-1]], 1)
    flat = lambda x: x.reshape(samples * length, -1)  # noqa: E731
    return {"draft_hidden": flat(draft), "target_hidden": flat(target), "context_hidden": flat(context),
            "next_token": torch.zeros(samples * length, dtype=torch.long),
            "sample": torch.arange(samples).repeat_interleave(length)}


def own_context_loss(adapter, rows, depth):
    """MSE at `depth` along every sample when each step reads the adapter's own previous prediction."""
    size, length = rows["draft_hidden"].shape[1], 12
    draft, target = rows["draft_hidden"].view(-1, length, size), rows["target_hidden"].view(-1, length, size)
    context = rows["context_hidden"].view(-1, length, size)
    errors = []
    with torch.no_grad():
        for start in range(length - depth + 1):
            read = context[:, start]
            for step in range(depth):
                read = adapter(draft[:, start + step], read)
            errors.append(torch.nn.functional.mse_loss(read, target[:, start + depth - 1]))
    return float(torch.stack(errors).mean())


def test_following_rows_stop_at_samples_the_split_and_sampled_tokens():
    rows = {"sample": torch.tensor([0, 0, 0, 1, 1, 1]), "fed_token": torch.tensor([5, 6, 7, 1, 2, 3])}
    tokens = torch.tensor([5, 9, 7, 1, 2, 3])  # row 1's text took a sampled token, not the greedy 9
    following = ta._following_rows(rows, tokens, torch.tensor([0, 1, 2, 3, 4]))  # row 5 held out
    assert following.tolist() == [1, -1, -1, 4, -1, -1]


def test_unrolled_training_reads_its_own_predictions_and_helps_deep_steps():
    train, held = sequence_rows(seed=5), sequence_rows(seed=55)
    seen = []
    config = dict(bottleneck=4, epochs=25, lr=3e-3, batch_size=32, context=True, split="samples", patience=30,
                  cos_weight=0.0, seed=0)
    plain, _ = ta.train_adapter(train, ta.TrainConfig(**config), progress=False)
    unrolled, log = ta.train_adapter(train, ta.TrainConfig(**config, unroll=3), progress=False)
    assert log["best_val_loss"] < log["initial_val_loss"]
    # the deepest step gains, where drafts read their own context (a bottleneck too small to fit exactly)
    assert own_context_loss(unrolled, held, 3) < 0.95 * own_context_loss(plain, held, 3)  # 0.88 measured
    # step 1 of a chain reads step 0's output as its context, gradient attached
    adapter = sd.BottleneckAdapter(12, 4, context_size=12)
    handle = adapter.register_forward_hook(lambda m, args, out: seen.append((args[1], out)))
    following = ta._following_rows(train, train["next_token"], torch.arange(len(train["sample"])))
    loss = ta._unrolled_loss(adapter, train["draft_hidden"], train["target_hidden"], train["next_token"],
                             train["context_hidden"], following, torch.tensor([0, 5]), ta.TrainConfig(unroll=2,
                                                                                                       context=True),
                             None)
    handle.remove()
    assert torch.equal(seen[1][0], seen[0][1]) and seen[1][0].requires_grad
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="needs context=True"):
        ta.train_adapter(train, ta.TrainConfig(unroll=2), progress=False)
    with pytest.raises(ValueError, match="leave self_context at 0"):
        ta.train_adapter(train, ta.TrainConfig(unroll=2, context=True, self_context=0.5), progress=False)
    with pytest.raises(ValueError, match="split must be"):
        ta.train_adapter(train, ta.TrainConfig(split="texts"), progress=False)
