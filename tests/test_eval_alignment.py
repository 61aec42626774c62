"""eval-alignment: the metrics on known cases, the speedup formula, the report files."""
import json

import pytest
import torch

import sdalign_rt as sd
from sdalign_rt import eval_alignment as ea


def test_formulas():
    assert ea.expected_tokens(0.5, 4) == pytest.approx((1 - 0.5 ** 5) / 0.5)
    assert ea.expected_tokens(1.0, 4) == 5.0 and ea.expected_tokens(0.0, 4) == 1.0
    assert ea.projected_speedup(0.5, 4, 0.1) == pytest.approx(ea.expected_tokens(0.5, 4) / 1.4)


def test_metrics_on_a_known_case(tmp_path):
    """Identity adapter; rows 0-3 of sample 0 aligned except row 2, sample 1 fully aligned."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(8, 16, generator=gen)
    draft = target.clone()
    draft[2] = -target[2]  # cosine -1 at the third position of sample 0
    head = torch.nn.Linear(16, 10, bias=False)
    tokens = head(target).argmax(-1)
    rows = {"draft_hidden": draft, "target_hidden": target, "next_token": tokens,
            "sample": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])}
    report = ea.evaluate_alignment(sd.BottleneckAdapter(16, 4), rows, head, gamma=4, cost_ratio=0.05)
    assert report["acceptance"]["0.9"]["relaxed"] == pytest.approx(7 / 8)
    assert report["acceptance"]["0.9"]["consecutive"] == pytest.approx((2 + 4) / 2 / 4)  # leading runs 2 and 4
    assert report["top1_agreement"] == pytest.approx(7 / 8)  # the flipped row predicts another token
    assert report["projection"]["feature@0.9"]["expected_tokens"] == pytest.approx(ea.expected_tokens(7 / 8, 4))
    ea.write_report(report, str(tmp_path / "report.json"))
    assert json.loads((tmp_path / "report.json").read_text())["rows"] == 8
    assert (tmp_path / "report.png").stat().st_size > 0


def test_leaves_its_inputs_as_they_were_and_reports_the_draft_vocabulary():
    """A bf16 head and adapter are evaluated in fp32 on copies (the caller's modules keep their dtype), and an
    adapter with a draft vocabulary gets top-1 through those head rows and their coverage of the tokens."""
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 12, bias=False).to(torch.bfloat16)
    adapter = sd.BottleneckAdapter(16, 4, draft_vocab=torch.tensor([0, 3, 5])).to(torch.bfloat16)
    x = torch.randn(40, 16, generator=gen)
    rows = {"draft_hidden": x, "target_hidden": x, "next_token": torch.tensor([0, 3, 7, 5] * 10)}
    report = ea.evaluate_alignment(adapter, rows, head, gamma=2)
    assert head.weight.dtype == torch.bfloat16 and adapter.down.weight.dtype == torch.bfloat16
    logits = x @ head.weight.float()[[0, 3, 5]].T
    expected = torch.tensor([0, 3, 5])[logits.argmax(-1)]
    assert report["top1_agreement_draft_vocab"] == pytest.approx(float((expected == rows["next_token"]).float().mean()))
    assert report["draft_vocab_coverage"] == pytest.approx(0.75)
