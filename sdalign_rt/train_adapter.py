"""Train a BottleneckAdapter on extracted rows: drafter state → verifier state.

Loss = mse_weight * MSE + cos_weight * (1 - cosine) + ce_weight * cross-entropy of the verifier's LM head on
the adapted state against the verifier's next token (the head is frozen and optional). A seeded split holds
out val_fraction of the rows; training stops after `patience` epochs without a better validation loss and
keeps the best weights. Every epoch is checkpointed, so an interrupted run resumes where it stopped; shuffles
are seeded per epoch, so a resumed run ends where an uninterrupted one would.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sdalign_rt.adapter import BottleneckAdapter

CHECKPOINT = "checkpoint.pt"
LOG = "training_log.json"


@dataclass
class TrainConfig:
    bottleneck: int = 256
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    patience: int = 4
    mse_weight: float = 1.0
    cos_weight: float = 1.0
    ce_weight: float = 0.0
    seed: int = 0


def adapter_loss(adapter, draft_hidden, target_hidden, next_token, config: TrainConfig, lm_head=None):
    predicted = adapter(draft_hidden)
    loss = config.mse_weight * F.mse_loss(predicted, target_hidden)
    loss = loss + config.cos_weight * (1 - F.cosine_similarity(predicted, target_hidden, dim=-1)).mean()
    if config.ce_weight and lm_head is not None:
        loss = loss + config.ce_weight * F.cross_entropy(lm_head(predicted), next_token)
    return loss


def _trajectory(config: dict) -> dict:
    """The settings that decide the weights epoch by epoch: epochs and patience only say when to stop, so a
    run may resume with more epochs."""
    return {k: v for k, v in config.items() if k not in ("epochs", "patience")}


def split_rows(count: int, val_fraction: float, seed: int):
    if count < 2:
        raise ValueError(f"need at least 2 rows to train with a validation split, got {count}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    val = max(1, int(round(count * val_fraction)))
    return order[val:], order[:val]


def train_adapter(rows: dict, config: TrainConfig, out_dir: str | None = None, lm_head=None,
                  progress: bool = True) -> tuple[BottleneckAdapter, dict]:
    """rows: {"draft_hidden" [N, Dd], "target_hidden" [N, Dv], "next_token" [N]} (see extract.load_pairs)."""
    draft = rows["draft_hidden"].float()
    target = rows["target_hidden"].float()
    tokens = rows["next_token"].long()
    if not (len(draft) == len(target) == len(tokens)):
        raise ValueError(f"row counts differ: {len(draft)} drafter, {len(target)} verifier, {len(tokens)} tokens")
    if not (torch.isfinite(draft).all() and torch.isfinite(target).all()):
        raise ValueError("the extracted hidden states contain non-finite values")
    if config.ce_weight and lm_head is None:
        raise ValueError("ce_weight > 0 needs the verifier's LM head (lm_head)")
    train_idx, val_idx = split_rows(len(tokens), config.val_fraction, config.seed)
    torch.manual_seed(config.seed)
    out_size = target.shape[1]
    adapter = BottleneckAdapter(draft.shape[1], config.bottleneck, out_size=out_size)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if lm_head is not None:
        lm_head = lm_head.float().requires_grad_(False)
    state = {"epoch": 0, "best_val": float("inf"), "best_epoch": -1, "stale": 0, "history": [], "best": None}
    checkpoint = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    if checkpoint and os.path.isfile(checkpoint):
        saved = torch.load(checkpoint, weights_only=False)
        if _trajectory(saved["config"]) != _trajectory(asdict(config)):
            raise ValueError(f"{checkpoint} was written with another TrainConfig; remove it to start over")
        adapter.load_state_dict(saved["adapter"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]

    def evaluate() -> float:
        adapter.eval()
        with torch.no_grad():
            return float(adapter_loss(adapter, draft[val_idx], target[val_idx], tokens[val_idx], config, lm_head))

    if state["epoch"] == 0:
        state["initial_val"] = evaluate()
    bar = tqdm(range(state["epoch"], config.epochs), desc="train-adapter", unit="epoch", disable=not progress)
    for epoch in bar:
        if state["stale"] >= config.patience:
            break
        adapter.train()
        order = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(config.seed + epoch + 1))]
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start: start + config.batch_size]
            loss = adapter_loss(adapter, draft[batch], target[batch], tokens[batch], config, lm_head)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        val = evaluate()
        state["history"].append({"epoch": epoch, "train_loss": total / len(order), "val_loss": val})
        if val < state["best_val"]:
            state.update(best_val=val, best_epoch=epoch, stale=0,
                         best={k: v.detach().clone() for k, v in adapter.state_dict().items()})
        else:
            state["stale"] += 1
        state["epoch"] = epoch + 1
        bar.set_postfix(val=f"{val:.4f}", best=f"{state['best_val']:.4f}")
        if checkpoint:
            os.makedirs(out_dir, exist_ok=True)
            torch.save({"config": asdict(config), "adapter": adapter.state_dict(),
                        "optimizer": optimizer.state_dict(), "state": state}, checkpoint)
    if state["best"] is not None:
        adapter.load_state_dict(state["best"])
    adapter.eval()
    log = {"config": asdict(config), "rows": {"train": len(train_idx), "val": len(val_idx)},
           "initial_val_loss": state.get("initial_val"), "best_val_loss": state["best_val"],
           "best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "history": state["history"]}
    if out_dir:
        adapter.save_pretrained(out_dir)
        with open(os.path.join(out_dir, LOG), "w") as f:
            json.dump(log, f, indent=2)
    return adapter, log
