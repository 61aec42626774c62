"""extract: prefix-conditioned (drafter state, verifier state, next token) rows, shards, resume."""
import copy
import json

import pytest
import torch

pytest.importorskip("transformers")

from sdalign_rt.extract import ExtractSample, extract_pairs, load_pairs  # noqa: E402
from test_decoder import DRAFTS, TARGET, VOCAB  # noqa: E402


def samples(count=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [ExtractSample(id=f"s{i}", input_ids=torch.randint(1, VOCAB, (1, 4 + i), generator=gen))
            for i in range(count)]


def test_rows_are_prefix_conditioned(tmp_path):
    """With drafter == verifier the two states coincide row by row, and the verifier's head on its state
    predicts the stored next token: position t is paired with token t + 1, no off-by-one."""
    manifest = extract_pairs(TARGET, TARGET, samples(), str(tmp_path), max_new_tokens=6, shard_rows=8,
                             dtype=torch.float32, progress=False)
    rows = load_pairs(str(tmp_path))
    assert rows["next_token"].shape == (18,) and sum(s["rows"] for s in manifest["shards"]) == 18
    assert len(manifest["shards"]) >= 2 and sorted(manifest["done"]) == ["s0", "s1", "s2"]
    torch.testing.assert_close(rows["draft_hidden"], rows["target_hidden"])
    with torch.no_grad():
        predicted = TARGET.lm_head(rows["target_hidden"]).argmax(-1)
    assert torch.equal(predicted, rows["next_token"])
    expected = torch.cat([TARGET.generate(s.input_ids, max_new_tokens=6, do_sample=False)[0, s.input_ids.shape[1]:]
                          for s in samples()])
    assert torch.equal(rows["next_token"], expected)


def test_draft_layers_store_layer_k_states(tmp_path):
    sample = samples(1)[0]
    extract_pairs(DRAFTS["perturbed"], TARGET, [sample], str(tmp_path), max_new_tokens=5, draft_layers=1,
                  dtype=torch.float32, progress=False)
    rows = load_pairs(str(tmp_path))
    full = TARGET.generate(sample.input_ids, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        states = DRAFTS["perturbed"](full, output_hidden_states=True).hidden_states[1][0]
    p = sample.input_ids.shape[1]
    torch.testing.assert_close(rows["draft_hidden"], states[p - 1: p + 4])
    assert rows["meta"]["draft_layers"] == 1


def test_resume_after_interruption(tmp_path):
    good = samples(3)
    broken = [good[0], ExtractSample(id="bad", input_ids=torch.ones(2, 3, dtype=torch.long)), good[1]]
    with pytest.raises(ValueError, match="one prompt"):  # fails mid-run, after s0 was extracted
        extract_pairs(TARGET, TARGET, broken, str(tmp_path), max_new_tokens=4, shard_rows=1, progress=False)
    assert json.loads((tmp_path / "manifest.json").read_text())["done"] == ["s0"]
    manifest = extract_pairs(TARGET, TARGET, good, str(tmp_path), max_new_tokens=4, shard_rows=1, progress=False)
    assert sorted(manifest["done"]) == ["s0", "s1", "s2"]
    assert load_pairs(str(tmp_path))["next_token"].shape == (12,)  # nothing extracted twice


def test_errors(tmp_path):
    extract_pairs(TARGET, TARGET, samples(1), str(tmp_path), max_new_tokens=2, progress=False)
    with pytest.raises(ValueError, match="draft_layers=None, not 1"):
        extract_pairs(TARGET, TARGET, samples(1), str(tmp_path), max_new_tokens=2, draft_layers=1, progress=False)
    with pytest.raises(ValueError, match=r"draft_layers must be an int in \[1, 2\]"):
        extract_pairs(TARGET, TARGET, samples(1), str(tmp_path / "x"), draft_layers=3, progress=False)
    with pytest.raises(FileNotFoundError, match="run sdalign-rt extract first"):
        load_pairs(str(tmp_path / "nothing"))


def test_batched_generation_keeps_rows_prefix_conditioned(tmp_path):
    """Left-padded batches of prompts: every stored token is the verifier's argmax on its own unpadded prefix,
    continuations stop after their first EOS, and given continuations are not regenerated."""
    plain = samples(5, seed=3)
    extract_pairs(TARGET, TARGET, plain, str(tmp_path / "plain"), max_new_tokens=6, batch_size=3, progress=False)
    verifier = copy.deepcopy(TARGET)
    eos = int(plain[0].continuation[0, 2])  # a token some row emits mid-way: that row must stop after it
    verifier.generation_config.eos_token_id = eos
    todo = samples(5, seed=3)
    extract_pairs(verifier, verifier, todo, str(tmp_path), max_new_tokens=6, batch_size=3, dtype=torch.float32,
                  progress=False)
    rows = load_pairs(str(tmp_path))
    assert todo[0].continuation.shape[1] == 3 and todo[0].continuation[0, -1] == eos
    eos = {eos}
    start = 0
    for sample in todo:
        cont = sample.continuation[0]
        assert not any(int(t) in eos for t in cont[:-1])
        full = torch.cat([sample.input_ids[0], cont])[None]
        with torch.no_grad():
            argmax = TARGET(full).logits[0, sample.input_ids.shape[1] - 1: -1].argmax(-1)
        assert torch.equal(argmax, cont) and torch.equal(rows["next_token"][start: start + len(cont)], cont)
        start += len(cont)
    given = ExtractSample(id="given", input_ids=todo[0].input_ids, continuation=torch.tensor([[7, 8]]))
    extract_pairs(TARGET, TARGET, [given], str(tmp_path / "g"), batch_size=4, progress=False)
    assert load_pairs(str(tmp_path / "g"))["next_token"].tolist() == [7, 8]


def test_one_pass_self_extraction_matches_the_two_pass_one(tmp_path):
    """extract_self_pairs (greedy decode through the runtime, states kept as it goes) gives the rows extract_pairs
    gives for a model drafting from its own first layer: same tokens, same states, the same contexts; an EOS ends
    a sample's rows after it."""
    from sdalign_rt.extract import extract_self_pairs

    gen = torch.Generator().manual_seed(3)
    items = [ExtractSample(id=f"s{i}", input_ids=torch.randint(1, VOCAB, (1, n), generator=gen))
             for i, n in enumerate((1, 4, 6))]
    extract_pairs(TARGET, TARGET, items, str(tmp_path / "two"), max_new_tokens=7, draft_layers=1,
                  dtype=torch.float32, progress=False)
    extract_self_pairs(TARGET, items, str(tmp_path / "one"), draft_layers=1, max_new_tokens=7, batch_size=2,
                       dtype=torch.float32, progress=False)
    two, one = load_pairs(str(tmp_path / "two")), load_pairs(str(tmp_path / "one"))
    assert torch.equal(one["next_token"], two["next_token"]) and torch.equal(one["sample"], two["sample"])
    for key in ("draft_hidden", "target_hidden", "context_hidden"):
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-4)
    first = two["next_token"][two["sample"] == 0].tolist()
    cut = next(i for i in range(1, len(first)) if first[i] not in first[:i])  # a token s0 emits for the first time
    eos_model = copy.deepcopy(TARGET)
    eos_model.generation_config.eos_token_id = first[cut]
    extract_self_pairs(eos_model, items[:1], str(tmp_path / "eos"), draft_layers=1, max_new_tokens=7,
                       dtype=torch.float32, progress=False)
    assert load_pairs(str(tmp_path / "eos"))["next_token"].tolist() == first[:cut + 1]


def test_one_pass_keeps_several_depths_and_sampled_text(tmp_path):
    """Several drafter depths in one pass equal one pass per depth; a sampled pass feeds sampled tokens while its
    labels stay the greedy ones (the argmax of the head on the kept final state), seeded and resumable."""
    from sdalign_rt.extract import extract_self_pairs

    gen = torch.Generator().manual_seed(4)
    items = [ExtractSample(id=f"s{i}", input_ids=torch.randint(1, VOCAB, (1, n), generator=gen))
             for i, n in enumerate((3, 5, 2, 4))]
    depths = TARGET.config.num_hidden_layers
    extract_self_pairs(TARGET, items, str(tmp_path / "all"), draft_layers=list(range(1, depths + 1)),
                       max_new_tokens=6, batch_size=2, dtype=torch.float32, progress=False)
    for k in range(1, depths + 1):
        extract_self_pairs(TARGET, items, str(tmp_path / f"k{k}"), draft_layers=k, max_new_tokens=6, batch_size=2,
                           dtype=torch.float32, progress=False)
        both, single = load_pairs(str(tmp_path / "all"), draft_layers=k), load_pairs(str(tmp_path / f"k{k}"))
        assert torch.equal(both["draft_hidden"], single["draft_hidden"])
        assert torch.equal(both["fed_token"], both["next_token"])  # greedy text: it continues with the label
    with pytest.raises(ValueError, match="pass draft_layers= one of them"):
        load_pairs(str(tmp_path / "all"))
    with pytest.raises(ValueError, match="not 2"):
        load_pairs(str(tmp_path / "k1"), draft_layers=2)

    sampled = dict(draft_layers=1, max_new_tokens=6, batch_size=2, dtype=torch.float32, temperature=1.5, seed=7,
                   progress=False)
    extract_self_pairs(TARGET, items, str(tmp_path / "s"), **sampled)
    rows = load_pairs(str(tmp_path / "s"))
    labels = TARGET.lm_head(rows["target_hidden"]).argmax(-1)
    assert torch.equal(rows["next_token"], labels)
    assert not torch.equal(rows["fed_token"], rows["next_token"])  # the text wandered off the greedy path
    extract_self_pairs(TARGET, items[:2], str(tmp_path / "half"), **sampled)  # the first batch, then the rest
    extract_self_pairs(TARGET, items, str(tmp_path / "half"), **sampled)
    assert torch.equal(load_pairs(str(tmp_path / "half"))["fed_token"], rows["fed_token"])
    with pytest.raises(ValueError, match="temperature=1.5"):
        extract_self_pairs(TARGET, items, str(tmp_path / "s"), **{**sampled, "temperature": 0.5})
