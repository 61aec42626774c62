"""train-adapter: validation loss goes down, runs are deterministic, resume ends where a straight run does."""
import pytest
import torch

import sdalign_rt as sd
from sdalign_rt import train_adapter as ta


def rows(count=600, draft=32, target=32, seed=0):
    """Target states that a bottleneck map of the drafter's states explains, plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count, draft, generator=gen)
    down = torch.randn(draft, 8, generator=gen) / draft ** 0.5
    up = torch.randn(8, target, generator=gen)
    base = x if target == draft else x @ torch.randn(draft, target, generator=gen) / draft ** 0.5
    y = base + torch.nn.functional.gelu(x @ down) @ up + 0.01 * torch.randn(count, target, generator=gen)
    return {"draft_hidden": x, "target_hidden": y, "next_token": torch.randint(0, 50, (count,), generator=gen)}


CONFIG = ta.TrainConfig(bottleneck=16, epochs=12, batch_size=64, lr=3e-3, patience=20)


def test_validation_loss_goes_down(tmp_path):
    adapter, log = ta.train_adapter(rows(), CONFIG, out_dir=str(tmp_path), progress=False)
    assert log["best_val_loss"] < 0.3 * log["initial_val_loss"]
    loaded = sd.BottleneckAdapter.from_pretrained(str(tmp_path))
    x = rows()["draft_hidden"][:5]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), adapter(x))
    assert (tmp_path / "training_log.json").exists()


def test_deterministic_with_a_seed():
    a, _ = ta.train_adapter(rows(), ta.TrainConfig(bottleneck=8, epochs=3, seed=5), progress=False)
    b, _ = ta.train_adapter(rows(), ta.TrainConfig(bottleneck=8, epochs=3, seed=5), progress=False)
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(p, q)


def test_resume_after_interruption(tmp_path, monkeypatch):
    config = ta.TrainConfig(bottleneck=8, epochs=5, batch_size=100, seed=1, patience=10)
    straight, _ = ta.train_adapter(rows(), config, progress=False)
    steps_per_epoch = -(-540 // 100)  # 600 rows, 10% held out
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def interrupting_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2 * steps_per_epoch:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupting_step)
    with pytest.raises(KeyboardInterrupt):
        ta.train_adapter(rows(), config, out_dir=str(tmp_path), progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed, log = ta.train_adapter(rows(), config, out_dir=str(tmp_path), progress=False)
    assert [h["epoch"] for h in log["history"]] == [0, 1, 2, 3, 4]
    for p, q in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q)


def test_different_hidden_sizes_and_cross_entropy():
    head = torch.nn.Linear(48, 50, bias=False)
    config = ta.TrainConfig(bottleneck=16, epochs=6, ce_weight=0.1, patience=20)
    adapter, log = ta.train_adapter(rows(target=48), config, lm_head=head, progress=False)
    assert not adapter.residual and adapter.out_size == 48
    assert log["best_val_loss"] < log["initial_val_loss"]


def test_errors(tmp_path):
    bad = rows()
    with pytest.raises(ValueError, match="row counts differ"):
        ta.train_adapter({**bad, "next_token": bad["next_token"][:-1]}, CONFIG, progress=False)
    nan = {**bad, "draft_hidden": bad["draft_hidden"].clone()}
    nan["draft_hidden"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ta.train_adapter(nan, CONFIG, progress=False)
    with pytest.raises(ValueError, match="need the verifier.s LM head"):
        ta.train_adapter(bad, ta.TrainConfig(ce_weight=1.0), progress=False)
    ta.train_adapter(bad, ta.TrainConfig(bottleneck=8, epochs=1), out_dir=str(tmp_path), progress=False)
    _, log = ta.train_adapter(bad, ta.TrainConfig(bottleneck=8, epochs=2), out_dir=str(tmp_path), progress=False)
    assert [h["epoch"] for h in log["history"]] == [0, 1]  # more epochs: resumed, not restarted
    with pytest.raises(ValueError, match="another TrainConfig"):
        ta.train_adapter(bad, ta.TrainConfig(bottleneck=8, epochs=3, lr=0.5), out_dir=str(tmp_path), progress=False)


def test_input_norm_and_reduced_draft_vocab(tmp_path):
    """A raw residual-stream input (large, shifted scale) with a learned input norm, and a draft vocabulary of
    the most frequent training tokens: training lowers the loss, the head rows follow draft_vocab, and both
    survive save / load."""
    data = rows()
    data["draft_hidden"] = data["draft_hidden"] * 40.0
    data["next_token"] = torch.cat([torch.zeros(400, dtype=torch.long), torch.arange(200) % 7 + 1])
    head = torch.nn.Linear(32, 50, bias=False)
    config = ta.TrainConfig(bottleneck=16, epochs=6, ce_weight=0.1, patience=20, input_norm=True, draft_vocab=4)
    adapter, log = ta.train_adapter(data, config, lm_head=head, out_dir=str(tmp_path), progress=False,
                                    norm_init=torch.full((32,), 0.5))
    assert log["best_val_loss"] < log["initial_val_loss"]
    assert adapter.input_norm and adapter.draft_vocab.tolist() == sorted(adapter.draft_vocab.tolist())
    assert 0 in adapter.draft_vocab.tolist() and len(adapter.draft_vocab) == 4
    torch.testing.assert_close(adapter.draft_head(head.weight), head.weight[adapter.draft_vocab])
    loaded = sd.BottleneckAdapter.from_pretrained(str(tmp_path))
    assert loaded.config() == adapter.config() and torch.equal(loaded.draft_vocab, adapter.draft_vocab)
    x = data["draft_hidden"][:3]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), adapter(x))
        # the input norm makes the adapter blind to the input's scale
        torch.testing.assert_close(adapter(x * 3), adapter(x), rtol=1e-4, atol=1e-4)


def test_frequent_tokens():
    tokens = torch.tensor([5, 5, 5, 2, 2, 9, 1, 1, 1, 1])
    assert ta.frequent_tokens(tokens, 2).tolist() == [1, 5]
    assert ta.frequent_tokens(tokens, 10).tolist() == [1, 2, 5, 9]


def test_held_out_rows_are_the_validation_split_in_order():
    data = {**rows(count=50), "meta": {"draft_layers": 2}}
    held = ta.held_out_rows(data, 0.2, 3)
    _, val = ta.split_rows(50, 0.2, 3)
    assert torch.equal(held["next_token"], data["next_token"][val.sort().values])
    assert torch.equal(held["draft_hidden"], data["draft_hidden"][val.sort().values])
    assert held["meta"] == {"draft_layers": 2} and len(held["next_token"]) == 10


def test_soft_targets_follow_the_verifier_distribution():
    """kl_weight: zero loss when the adapter predicts the verifier's state exactly, positive otherwise, and it
    needs the head."""
    gen = torch.Generator().manual_seed(2)
    head = torch.randn(40, 16, generator=gen)
    target = torch.randn(8, 16, generator=gen)
    config = ta.TrainConfig(mse_weight=0.0, cos_weight=0.0, kl_weight=1.0)
    none = torch.full((8,), -100)
    assert float(ta.prediction_loss(target, target, none, config, head)) == pytest.approx(0.0, abs=1e-6)
    assert float(ta.prediction_loss(target + torch.randn(8, 16, generator=gen), target, none, config, head)) > 0.05
    with pytest.raises(ValueError, match="kl_weight > 0"):
        ta.train_adapter(rows(), ta.TrainConfig(kl_weight=1.0), progress=False)
