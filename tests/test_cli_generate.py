"""sdalign-rt generate on local checkpoints saved and reloaded through transformers' loaders."""
import json

import pytest
import torch

pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import sdalign_rt as sd  # noqa: E402
from sdalign_rt import cli  # noqa: E402
from test_decoder import DRAFTS, TARGET, VOCAB  # noqa: E402


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>", pad_token="<unk>")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    TARGET.save_pretrained(root / "target")
    word_tokenizer().save_pretrained(root / "target")
    DRAFTS["perturbed"].save_pretrained(root / "draft")
    sd.BottleneckAdapter(64, 16).save_pretrained(str(root / "adapter"))
    return root


@pytest.mark.parametrize("tree,extra", [("chain:3", []), ("static:[[0],[1],[0,0],[0,1]]", []),
                                        ("dynamic:2,3,5", []), ("chain:3", ["--draft-layers", "1"]),
                                        ("chain:2+lookup-top:1", []), ("lookup:3", None)])
def test_generate_matches_the_reloaded_verifier(checkpoints, tree, extra, capsys):
    """extra None: no drafter at all (prompt lookup alone)."""
    prompts = ["w5 w9 w11", "w40 w2"]
    report = checkpoints / "out.json"
    drafter = [] if extra is None else ["--draft", str(checkpoints / "draft"), "--adapter", str(checkpoints / "adapter")]
    assert cli.main(["generate", "--target", str(checkpoints / "target"), *drafter, "--tree", tree,
                     "--max-new-tokens", "12", "--prompt", prompts[0], "--prompt", prompts[1], "--json", str(report),
                     *(extra or [])]) == 0
    printed = capsys.readouterr().out
    result = json.loads(report.read_text())
    tokenizer = word_tokenizer()
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    target = AutoModelForCausalLM.from_pretrained(checkpoints / "target")
    expected = target.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=0)
    texts = tokenizer.batch_decode(expected[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    assert result["texts"] == texts
    assert texts[0] in printed and '"mean_accepted"' in printed


def test_generate_drafts_from_the_target_itself(checkpoints, monkeypatch, capsys):
    """No --draft: the target drafts from its own first K layers, loaded once (one copy, one shared cache)."""
    loads = []
    original = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a) or original(*a, **k))
    report = checkpoints / "self.json"
    assert cli.main(["generate", "--target", str(checkpoints / "target"), "--draft-layers", "1", "--tree", "chain:2",
                     "--max-new-tokens", "10", "--prompt", "w5 w9 w11", "--json", str(report)]) == 0
    assert len(loads) == 1
    tokenizer = word_tokenizer()
    batch = tokenizer(["w5 w9 w11"], return_tensors="pt")
    expected = original(checkpoints / "target").generate(**batch, max_new_tokens=10, do_sample=False, pad_token_id=0)
    texts = tokenizer.batch_decode(expected[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    assert json.loads(report.read_text())["texts"] == texts


@pytest.mark.parametrize("flags,message", [
    ([], "pass --draft DRAFTER, or --draft-layers K"),
    (["--draft-layers", "0"], "--draft-layers must be >= 1"),
    (["--draft-layers", "1", "--temperature", "0.7"], "shape sample mode's distribution; --mode is greedy"),
    (["--draft-layers", "1", "--threshold", "0.8"], "feature mode's cosine threshold; --mode is greedy"),
    (["--draft-layers", "1", "--dtype", "float16"], "float16 on the CPU"),
])
def test_generate_refuses_flag_combinations_that_cannot_work(checkpoints, flags, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["generate", "--target", str(checkpoints / "target"), "--prompt", "w2", *flags])


def test_generate_refuses_a_full_copy_of_the_target_as_drafter(checkpoints):
    with pytest.raises(SystemExit, match="pass --draft-layers K"):
        cli.main(["generate", "--target", str(checkpoints / "target"), "--draft", str(checkpoints / "target"),
                  "--prompt", "w2"])


def test_generate_reports_missing_checkpoints(tmp_path):
    with pytest.raises(SystemExit, match="--target .* is not a directory"):
        cli.main(["generate", "--target", str(tmp_path / "nope"), "--draft", str(tmp_path), "--prompt", "w2"])


def test_extract_command_resumes(checkpoints, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w9 w11\nw40 w2\n")
    args = ["extract", "--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft"),
            "--prompts", str(prompts), "--out", str(tmp_path / "pairs"), "--max-new-tokens", "6", "--shard-rows", "4"]
    assert cli.main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["samples"] == 2 and first["rows"] == 12
    prompts.write_text("w5 w9 w11\nw40 w2\nw7 w7\n")  # one more prompt: only it is extracted
    assert cli.main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["samples"] == 3 and second["rows"] == 18


def test_extract_then_train_then_generate(checkpoints, tmp_path, capsys):
    """The pipeline's first two stages on the command line, and the adapter they make drives decoding."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([f"w{i} w{i + 3} w{i + 7}" for i in range(2, 14)]))
    pairs, adapter = tmp_path / "pairs", tmp_path / "adapter"
    assert cli.main(["extract", "--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft"),
                     "--prompts", str(prompts), "--out", str(pairs), "--max-new-tokens", "8"]) == 0
    capsys.readouterr()
    assert cli.main(["train-adapter", "--pairs", str(pairs), "--out", str(adapter), "--bottleneck", "16",
                     "--epochs", "8", "--lr", "3e-3", "--ce-weight", "0.1", "--target", str(checkpoints / "target")]) == 0
    log = json.loads(capsys.readouterr().out)
    assert log["best_val_loss"] < log["initial_val_loss"]
    assert cli.main(["generate", "--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft"),
                     "--adapter", str(adapter), "--prompt", "w5 w9", "--max-new-tokens", "8"]) == 0


def test_eval_alignment_command(checkpoints, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([f"w{i} w{i + 5}" for i in range(2, 22)]))
    pairs, adapter, report = tmp_path / "pairs", tmp_path / "adapter", tmp_path / "report.json"
    target, draft = str(checkpoints / "target"), str(checkpoints / "draft")
    assert cli.main(["extract", "--target", target, "--draft", draft, "--prompts", str(prompts), "--out", str(pairs),
                     "--max-new-tokens", "8"]) == 0
    assert cli.main(["train-adapter", "--pairs", str(pairs), "--out", str(adapter), "--bottleneck", "16",
                     "--epochs", "4"]) == 0
    capsys.readouterr()
    assert cli.main(["eval-alignment", "--pairs", str(pairs), "--adapter", str(adapter), "--target", target,
                     "--out", str(report), "--cost-ratio", "0.1"]) == 0
    result = json.loads(report.read_text())
    assert result["rows"] == 16 and set(result["acceptance"]) == {"0.8", "0.85", "0.9", "0.95"}
    assert (tmp_path / "report.png").exists()


def test_plan_tree_writes_a_plan_that_generate_reads(checkpoints, capsys):
    prompts = checkpoints / "calibration.json"
    prompts.write_text(json.dumps(["w5 w9 w11", "w40 w2 w7"]))
    plan = checkpoints / "plan.json"
    assert cli.main(["plan-tree", "--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft"),
                     "--prompts", str(prompts), "--max-nodes", "5", "--max-depth", "3", "--ranks", "2",
                     "--new-tokens", "8", "--json", str(plan)]) == 0
    report = json.loads(plan.read_text())
    assert report["plan"]["nodes"] <= 5 and report["measured_tokens_per_s"] > 0
    assert cli.main(["generate", "--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft"),
                     "--tree", f"static:{plan}", "--max-new-tokens", "6", "--prompt", "w5 w9"]) == 0
