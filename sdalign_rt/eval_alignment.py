"""How well an adapter aligns drafter states with the verifier's, and what that predicts for decoding.

On held-out rows (see extract / train_adapter): the cosine distribution of adapter(drafter state) vs the
verifier's state; top-1 / top-5 agreement of the verifier's LM head on the adapted state with the verifier's
next token; feature acceptance at thresholds, relaxed (share of positions) and consecutive (leading accepted
run of gamma-long windows of each sample, through sd.ops.cosine_accept); and the analytic speedup of a chain
of gamma drafts with per-token acceptance a, E[tokens] = (1 - a^(gamma+1)) / (1 - a), and its
overhead-corrected form E[tokens] / (1 + gamma * c) with c = draft cost / verifier cost per token, next to
tau / alpha measured in the real decoding loop when given.
"""
from __future__ import annotations

import copy
import json
import os

import torch

from sdalign_rt import ops
from sdalign_rt.plotting import pyplot

THRESHOLDS = (0.8, 0.85, 0.9, 0.95)


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens per verifier step for a chain of gamma drafts, each accepted with probability alpha."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def projected_speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
    return expected_tokens(alpha, gamma) / (1 + gamma * cost_ratio)


def _windows(sample: torch.Tensor, gamma: int):
    """Non-overlapping gamma-long windows of consecutive rows within each sample: index tensor [W, gamma]."""
    windows = []
    for s in torch.unique(sample).tolist():
        rows = torch.nonzero(sample == s).flatten()
        for start in range(0, len(rows) - gamma + 1, gamma):
            windows.append(rows[start: start + gamma])
    return torch.stack(windows) if windows else torch.empty(0, gamma, dtype=torch.long)


@torch.no_grad()
def evaluate_alignment(adapter, rows: dict, lm_head, *, gamma: int = 4, cost_ratio: float = 0.0,
                       thresholds=THRESHOLDS, measured: dict | None = None) -> dict:
    draft = rows["draft_hidden"].float()
    target = rows["target_hidden"].float()
    tokens = rows["next_token"].long()
    # In fp32, leaving the caller's adapter as it was; a context-conditioned adapter reads the true previous
    # verifier state here (teacher forcing: at depth 1 of a draft tree it does so too, deeper it reads its own).
    context = rows.get("context_hidden") if adapter.context_size else None
    if adapter.context_size and context is None:
        raise ValueError("this adapter reads the verifier's previous state: the rows need context_hidden")
    adapted = copy.deepcopy(adapter).float().eval()(draft, None if context is None else context.float())
    sims = torch.nn.functional.cosine_similarity(adapted, target, dim=-1)
    head_weight = (lm_head.weight if isinstance(lm_head, torch.nn.Module) else lm_head).detach().float()
    bias = getattr(lm_head, "bias", None)
    logits = torch.nn.functional.linear(adapted, head_weight, None if bias is None else bias.detach().float())
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    top1_agreement = float((top5[:, 0] == tokens).float().mean())
    report = {
        "rows": len(tokens), "gamma": gamma, "cost_ratio": cost_ratio,
        "cosine": {"mean": float(sims.mean()), "median": float(sims.median()),
                   "p10": float(sims.quantile(0.1)), "p90": float(sims.quantile(0.9)),
                   "histogram": torch.histc(sims, bins=20, min=-1, max=1).long().tolist()},
        "top1_agreement": top1_agreement,
        "top5_agreement": float((top5 == tokens[:, None]).any(-1).float().mean()),
        "acceptance": {},
    }
    if adapter.draft_vocab is not None:  # top-1 through the reduced head the drafts really use
        vocab = adapter.draft_vocab.to(tokens.device)
        draft_bias = None if bias is None else bias.detach().float()[vocab]
        drafted = vocab[torch.nn.functional.linear(adapted, head_weight[vocab], draft_bias).argmax(-1)]
        report["top1_agreement_draft_vocab"] = float((drafted == tokens).float().mean())
        report["draft_vocab_coverage"] = float(torch.isin(tokens, vocab).float().mean())
    windows = _windows(rows.get("sample", torch.zeros(len(tokens), dtype=torch.long)), gamma)
    for t in thresholds:
        entry = {"relaxed": float((sims >= t).float().mean())}
        if len(windows):
            _, _, n_accept = ops.cosine_accept(adapted[windows], target[windows], t, "consecutive")
            entry["consecutive"] = float(n_accept.float().mean()) / gamma
        report["acceptance"][str(t)] = entry
    report["projection"] = {
        "greedy_top1": {"alpha": top1_agreement, "expected_tokens": expected_tokens(top1_agreement, gamma),
                        "speedup": projected_speedup(top1_agreement, gamma, cost_ratio)},
        **{f"feature@{t}": {"alpha": e["relaxed"], "expected_tokens": expected_tokens(e["relaxed"], gamma),
                            "speedup": projected_speedup(e["relaxed"], gamma, cost_ratio)}
           for t, e in report["acceptance"].items()},
    }
    if measured is not None:
        report["measured"] = {k: measured[k] for k in ("mean_accepted", "acceptance_rate") if k in measured}
    return report


def write_report(report: dict, path: str) -> None:
    """JSON at path and a PNG beside it: the cosine histogram and acceptance by threshold."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    plt = pyplot(os.path.splitext(path)[0] + ".png")
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    edges = torch.linspace(-1, 1, 21)
    left.bar(((edges[:-1] + edges[1:]) / 2).tolist(), report["cosine"]["histogram"], width=0.09)
    left.set_xlabel("cosine(adapter(drafter state), verifier state)")
    left.set_ylabel("rows")
    names = list(report["acceptance"])
    xs = range(len(names))
    right.bar([x - 0.2 for x in xs], [report["acceptance"][n]["relaxed"] for n in names], width=0.4, label="relaxed")
    right.bar([x + 0.2 for x in xs], [report["acceptance"][n].get("consecutive", 0) for n in names], width=0.4,
              label=f"consecutive (gamma={report['gamma']})")
    right.set_xticks(list(xs))
    right.set_xticklabels(names)
    right.set_xlabel("threshold")
    right.set_ylabel("acceptance")
    right.legend(fontsize=8)
    fig.suptitle(f"alignment: top-1 {report['top1_agreement']:.2f}, top-5 {report['top5_agreement']:.2f}")
    fig.tight_layout()
    fig.savefig(os.path.splitext(path)[0] + ".png", dpi=110)
    plt.close(fig)
