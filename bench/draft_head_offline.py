"""Offline: would a bigger draft head (EAGLE's one decoder layer) beat the bottleneck adapter? Top-1 only.

    python bench/draft_head_offline.py [--epochs 3] [--json bench/results/draft_head_offline_cpu.json]

Rows: the embedded default's training distillation (SmolLM2-135M-Instruct's own answers to the model-written
conversations, layer-2 states, ~285k rows; the demo's cache, distilled by `sdalign-rt demo --retrain` when
missing, ~40 minutes) with whole conversations held out as the adapter's training holds them out, and the frozen
evaluation set's greedy answers (distilled by bench/lookup_offline.py's cache folder, made here if missing).
Heads, trained here with the same loss as the adapter (MSE + (1 - cos) + cross-entropy over the 8192-token draft
vocabulary), one-cycle AdamW, batches of 32 answers:
  attention  fused input W [norm(layer-2 state), norm(previous final state)], then one pre-norm decoder layer
             (causal self-attention over the answer so far with RoPE, 9 heads, SwiGLU 1536): EAGLE's draft head
  mlp        the same without the attention block (a per-position head with 4x the adapter's parameters)
and the shipped BottleneckAdapter (R = 512) as trained. Measures top-1 (is the draft the verifier's greedy next
token) with the true previous state, as at a tree's root. This is a probe of capacity, not a runtime path.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class RMSNorm(nn.Module):
    def __init__(self, width: int, init: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(init.clone() if init is not None else torch.ones(width))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


def rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary positions 0..T-1 on [B, H, T, d]."""
    d, t = x.shape[-1], x.shape[-2]
    angle = torch.arange(t).float()[:, None] / (10000 ** (torch.arange(0, d, 2).float() / d))[None]
    cos, sin = angle.cos(), angle.sin()
    first, second = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], -1)


class DraftLayer(nn.Module):
    def __init__(self, width: int, norm_init: torch.Tensor, attention: bool, heads: int = 9, inner: int = 1536):
        super().__init__()
        self.state_norm, self.context_norm = RMSNorm(width, norm_init), RMSNorm(width)
        self.fuse = nn.Linear(2 * width, width, bias=False)
        with torch.no_grad():  # starts as the normalised drafter state, as the adapter's residual does
            self.fuse.weight.zero_()
            self.fuse.weight[:, :width] = torch.eye(width)
        self.attention, self.heads = attention, heads
        self.attn_norm, self.mlp_norm = RMSNorm(width), RMSNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width, bias=False), nn.Linear(width, width, bias=False)
        self.gate, self.up = nn.Linear(width, inner, bias=False), nn.Linear(width, inner, bias=False)
        self.down = nn.Linear(inner, width, bias=False)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.down.weight)

    def forward(self, state, context, mask):  # [B, T, D] each, mask [B, T]
        x = self.fuse(torch.cat([self.state_norm(state), self.context_norm(context)], -1))
        batch, t, width = x.shape
        if self.attention:
            q, k, v = self.qkv(self.attn_norm(x)).view(batch, t, 3, self.heads, width // self.heads).permute(
                2, 0, 3, 1, 4)
            visible = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & mask[:, None, None, :]
            a = F.scaled_dot_product_attention(rope(q), rope(k), v, attn_mask=visible)
            x = x + self.out(a.transpose(1, 2).reshape(batch, t, width))
        y = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


def answers(rows: dict, index: torch.Tensor) -> list:
    """The rows of `index` as runs of consecutive positions of one answer."""
    index = index.sort().values
    sample = rows["sample"][index]
    cut = torch.nonzero((sample[1:] != sample[:-1]) | (index[1:] != index[:-1] + 1)).flatten() + 1
    bounds = [0] + cut.tolist() + [len(index)]
    return [index[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def batches(rows: dict, runs: list, size: int, order=None):
    order = range(len(runs)) if order is None else order.tolist()
    order = list(order)
    for start in range(0, len(order), size):
        chunk = [runs[i] for i in order[start: start + size]]
        t = max(len(c) for c in chunk)
        mask = torch.zeros(len(chunk), t, dtype=torch.bool)
        out = {key: torch.zeros(len(chunk), t, *rows[key].shape[1:], dtype=torch.float32 if rows[key].is_floating_point()
                                else torch.long) for key in ("draft_hidden", "context_hidden", "target_hidden",
                                                            "next_token")}
        for b, c in enumerate(chunk):
            mask[b, : len(c)] = True
            for key in out:
                out[key][b, : len(c)] = rows[key][c].to(out[key].dtype)
        yield out, mask


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", default=os.path.join(RESULTS, "draft_head_offline_cpu.json"))
    args = parser.parse_args(argv)

    from sdalign_rt.adapter import BottleneckAdapter
    from sdalign_rt.demo import experiment
    from sdalign_rt.demo.smollm2 import checkpoint, default_cache_dir
    from sdalign_rt.extract import load_pairs
    from sdalign_rt.train_adapter import _split, frequent_tokens

    torch.manual_seed(0)
    model, tokenizer = experiment.load_model(checkpoint(), "float32")
    config = experiment.DemoConfig()
    k = config.draft_layers
    rows = experiment.distilled_rows(model, tokenizer, k, default_cache_dir(), config)
    frozen_dir = os.path.join(default_cache_dir(), f"distil-frozen-eval-k{k}-n96")
    if not os.path.isdir(frozen_dir):
        import lookup_offline  # noqa: F401 - the same folder, made by that script's first step

        lookup_offline.main([])
    frozen = load_pairs(frozen_dir, draft_layers=k)
    train_idx, held_idx = _split(rows, "samples", 0.1, config.seed)  # the adapter's own held-out conversations
    tokens = rows["next_token"].long()
    vocab = frequent_tokens(tokens[train_idx], config.draft_vocab)
    index = torch.full((model.config.vocab_size,), -100, dtype=torch.long)
    index[vocab] = torch.arange(len(vocab))
    head = model.get_output_embeddings().weight.detach().float()[vocab]
    norm = model.model.norm.weight.detach().float()
    sets = {"held_out": (rows, held_idx), "frozen_eval": (frozen, torch.arange(len(frozen["next_token"])))}

    def top1(predict) -> dict:
        result = {}
        with torch.no_grad():
            for name, (data, idx) in sets.items():
                hit = total = 0
                for batch, mask in batches(data, answers(data, idx), 64):
                    states = predict(batch, mask)[mask]
                    hit += int((vocab[(states @ head.T).argmax(-1)] == batch["next_token"][mask]).sum())
                    total += int(mask.sum())
                result[name] = hit / total
        return result

    shipped = BottleneckAdapter.from_pretrained(experiment.SHIPPED).float().eval()
    report = {"shipped adapter (R=512)": {"parameters": sum(p.numel() for p in shipped.parameters()),
                                          "top1": top1(lambda b, m: shipped(b["draft_hidden"], b["context_hidden"]))}}
    print(report, flush=True)
    runs = answers(rows, train_idx)
    for name, attention in (("attention", True), ("mlp", False)):
        torch.manual_seed(0)
        layer = DraftLayer(norm.shape[0], norm, attention)
        optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
        steps = args.epochs * math.ceil(len(runs) / 32)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=steps, pct_start=0.05)
        history, start = [], time.perf_counter()
        for epoch in range(args.epochs):
            layer.train()
            order = torch.randperm(len(runs), generator=torch.Generator().manual_seed(epoch))
            for batch, mask in batches(rows, runs, 32, order):
                predicted = layer(batch["draft_hidden"], batch["context_hidden"], mask)[mask]
                target = batch["target_hidden"][mask]
                loss = (F.mse_loss(predicted, target) + (1 - F.cosine_similarity(predicted, target, dim=-1)).mean()
                        + F.cross_entropy(predicted @ head.T, index[batch["next_token"][mask]], ignore_index=-100))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
            layer.eval()
            history.append({"epoch": epoch, "top1": top1(lambda b, m: layer(b["draft_hidden"], b["context_hidden"], m)),
                            "seconds": time.perf_counter() - start})
            print(name, history[-1], flush=True)
        unused = () if attention else (layer.qkv, layer.out, layer.attn_norm)  # built, never run without attention
        used = sum(p.numel() for p in layer.parameters()) - sum(p.numel() for m in unused for p in m.parameters())
        report[name] = {"parameters": used, "top1": history[-1]["top1"],
                        "by_epoch": history}
    result = {"what": __doc__.splitlines()[0], "command": "python bench/draft_head_offline.py", "epochs": args.epochs,
              "rows": {"train": len(train_idx), "held_out": len(held_idx), "frozen_eval": len(frozen["next_token"])},
              "heads": report, "environment": experiment.environment()}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
