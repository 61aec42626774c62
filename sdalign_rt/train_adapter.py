"""Train a BottleneckAdapter on extracted rows: drafter state → verifier state.

With context=True the adapter also reads the verifier's final state at the previous position (the rows'
context_hidden; EAGLE's feature fusion). Loss = mse_weight * MSE + cos_weight * (1 - cosine) + ce_weight *
cross-entropy of the verifier's LM head on
the adapted state against the verifier's next token (the head is frozen and optional). With draft_vocab = N the
adapter gets a reduced draft vocabulary: the N most frequent next tokens of the training rows, and the
cross-entropy is taken over those rows of the head (rows whose token is outside it only count in MSE / cosine). A seeded split holds
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
    kl_weight: float = 0.0  # KL(verifier's distribution || the adapter's) over the head's (draft vocabulary's) rows
    input_norm: bool = False  # RMS-normalise the input first (raw layer-k states of a shallow drafter)
    draft_vocab: int = 0  # > 0: draft over the N most frequent next tokens only (EAGLE-3's reduced head)
    context: bool = False  # condition on the verifier's previous final state (EAGLE-style feature fusion)
    # With context: the share of training rows that read the adapter's own prediction of the previous state
    # instead of the true one, as every node below a draft tree's root does in decoding (needs rows' "sample").
    self_context: float = 0.0
    # With context: train through the adapter's own predictions for `unroll` consecutive positions (EAGLE-3's
    # training-time test): step s reads step s - 1's predicted state as its context, as draft depth s + 1 does in
    # decoding, with the gradient flowing back through the chain; a chain goes on only where the text continued
    # with the verifier's greedy token (where a correct draft leads). Step s's loss is weighted unroll_decay ** s.
    unroll: int = 1
    unroll_decay: float = 0.8
    # "rows": hold out single rows; "samples": hold out whole samples (texts), so no validation row sits next
    # to a training row and unrolled chains never cross the split.
    split: str = "rows"
    seed: int = 0


def adapter_loss(adapter, draft_hidden, target_hidden, next_token, config: TrainConfig, head_weight=None,
                 context=None):
    """next_token holds indices into head_weight's rows (-100: not in the draft vocabulary, no CE term)."""
    return prediction_loss(adapter(draft_hidden, context), target_hidden, next_token, config, head_weight)


def prediction_loss(predicted, target_hidden, next_token, config: TrainConfig, head_weight=None):
    loss = config.mse_weight * F.mse_loss(predicted, target_hidden)
    loss = loss + config.cos_weight * (1 - F.cosine_similarity(predicted, target_hidden, dim=-1)).mean()
    if head_weight is None or not (config.ce_weight or config.kl_weight):
        return loss
    logits = predicted @ head_weight.T
    if config.ce_weight and bool((next_token >= 0).any()):
        loss = loss + config.ce_weight * F.cross_entropy(logits, next_token, ignore_index=-100)
    if config.kl_weight:  # the verifier's whole distribution (over the head's rows) as a soft target
        with torch.no_grad():
            target_log = F.log_softmax(target_hidden @ head_weight.T, dim=-1)
        loss = loss + config.kl_weight * F.kl_div(F.log_softmax(logits, dim=-1), target_log, log_target=True,
                                                  reduction="batchmean")
    return loss


def _self_context(adapter, draft, context, previous, rows, share: float, generator) -> torch.Tensor:
    """The batch's contexts with a share of them replaced by the adapter's own prediction of the previous row's
    state (made from that row's drafter state and true context, no gradient through it)."""
    chosen = (previous[rows] >= 0) & (torch.rand(len(rows), generator=generator) < share)
    mixed = context[rows].clone()
    if bool(chosen.any()):
        before = previous[rows][chosen]
        with torch.no_grad():
            mixed[chosen] = adapter(draft[before], context[before]).float()
    return mixed


def _following_rows(rows: dict, tokens: torch.Tensor, train_idx: torch.Tensor) -> torch.Tensor:
    """Per row, the row an unrolled chain steps to next (-1: none): the next position of the same sample, on the
    same side of the split, where the text continued with the greedy token (rows' fed_token, when kept)."""
    if rows.get("sample") is None:
        raise ValueError("unroll > 1 needs the rows' sample numbers (load_pairs gives them)")
    sample = rows["sample"]
    count = len(sample)
    following = torch.arange(count) + 1
    following[-1] = -1
    side = torch.zeros(count, dtype=torch.bool)
    side[train_idx] = True
    valid = torch.zeros(count, dtype=torch.bool)
    valid[:-1] = (sample[1:] == sample[:-1]) & (side[1:] == side[:-1])
    if rows.get("fed_token") is not None:
        valid &= rows["fed_token"].long() == tokens
    following[~valid] = -1
    return following


def _unrolled_loss(adapter, draft, target, tokens, context, following, start, config: TrainConfig, head_weight):
    """The training-time test: step 0 reads the true context at the chain's first row; every later step reads the
    previous step's predicted state at the row after; losses weighted unroll_decay ** step, over the rows that
    reach that step."""
    rows, read = start, context[start]
    total = weights = 0.0
    for step in range(config.unroll):
        if step:
            after = following[rows]
            keep = after >= 0
            if not bool(keep.any()):
                break
            rows, read = after[keep], predicted[keep]
        predicted = adapter(draft[rows], read)
        weight = config.unroll_decay ** step * len(rows) / len(start)
        total = total + weight * prediction_loss(predicted, target[rows], tokens[rows], config, head_weight)
        weights += weight
    return total / weights


def frequent_tokens(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` most frequent ids of tokens (ties by id), as a draft vocabulary."""
    ids, freq = tokens.unique(return_counts=True)
    order = torch.argsort(freq, descending=True, stable=True)
    return ids[order[:count]].sort().values


def _trajectory(config: dict) -> dict:
    """The settings that decide the weights epoch by epoch: epochs and patience only say when to stop, so a
    run may resume with more epochs."""
    return {k: v for k, v in config.items() if k not in ("epochs", "patience")}


def split_rows(count: int, val_fraction: float, seed: int, groups: torch.Tensor | None = None):
    """(train, validation) row indices. groups [count]: hold out whole groups (samples), drawn in a seeded order
    until they cover val_fraction of the rows."""
    if count < 2:
        raise ValueError(f"need at least 2 rows to train with a validation split, got {count}")
    val = max(1, int(round(count * val_fraction)))
    if groups is None:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
        return order[val:], order[:val]
    ids, sizes = groups.unique(return_counts=True)
    if len(ids) < 2:
        raise ValueError("a split by samples needs at least 2 samples")
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    taken = int((sizes[order].cumsum(0) < val).sum()) + 1
    held = torch.isin(groups, ids[order[:min(taken, len(ids) - 1)]])
    every = torch.arange(count)
    return every[~held][torch.randperm(int((~held).sum()), generator=torch.Generator().manual_seed(seed))], every[held]


def _split(rows: dict, split: str, val_fraction: float, seed: int) -> tuple:
    groups = None
    if split == "samples":
        if rows.get("sample") is None:
            raise ValueError('split="samples" needs the rows\' sample numbers (load_pairs gives them)')
        groups = rows["sample"]
    elif split != "rows":
        raise ValueError(f'split must be "rows" or "samples", got {split!r}')
    return split_rows(len(rows["next_token"]), val_fraction, seed, groups)


def held_out_rows(rows: dict, val_fraction: float, seed: int, split: str = "rows") -> dict:
    """The rows train_adapter held out for validation with this fraction, seed and split, in extraction order
    (entries that are not per-row tensors, such as "meta", pass through)."""
    _, held_out = _split(rows, split, val_fraction, seed)
    held_out = held_out.sort().values
    return {key: (value[held_out] if isinstance(value, torch.Tensor) else value) for key, value in rows.items()}


def train_adapter(rows: dict, config: TrainConfig, out_dir: str | None = None, lm_head=None,
                  progress: bool = True, norm_init: torch.Tensor | None = None) -> tuple[BottleneckAdapter, dict]:
    """rows: {"draft_hidden" [N, Dd], "target_hidden" [N, Dv], "next_token" [N], and "context_hidden" [N, Dv] for
    config.context} (see extract.load_pairs).
    lm_head: the verifier's LM head (a module or its weight), needed for ce_weight and draft_vocab.
    norm_init: the input norm's starting scale (the drafter's final norm weight); ones by default."""
    draft = rows["draft_hidden"].float()
    target = rows["target_hidden"].float()
    tokens = rows["next_token"].long()
    if not (len(draft) == len(target) == len(tokens)):
        raise ValueError(f"row counts differ: {len(draft)} drafter, {len(target)} verifier, {len(tokens)} tokens")
    if not (torch.isfinite(draft).all() and torch.isfinite(target).all()):
        raise ValueError("the extracted hidden states contain non-finite values")
    if not isinstance(config.unroll, int) or config.unroll < 1:
        raise ValueError(f"unroll must be an int >= 1, got {config.unroll!r}")
    if config.unroll > 1 and not config.context:
        raise ValueError("unroll > 1 trains through the adapter's own context: it needs context=True")
    if config.unroll > 1 and config.self_context:
        raise ValueError("unroll > 1 already feeds the adapter its own context: leave self_context at 0")
    context = previous = following = None
    if config.context:
        if rows.get("context_hidden") is None:
            raise ValueError("context=True needs the rows' context_hidden (extract again with this version)")
        context = rows["context_hidden"].float()
        if config.self_context:
            if rows.get("sample") is None:
                raise ValueError("self_context needs the rows' sample numbers (load_pairs gives them)")
            sample = rows["sample"]
            # The row before each row in its sample (-1 for a sample's first row): rows are in text order.
            previous = torch.arange(len(sample)) - 1
            previous[1:][sample[1:] != sample[:-1]] = -1
            previous[0] = -1
    if (config.ce_weight or config.kl_weight or config.draft_vocab) and lm_head is None:
        raise ValueError("ce_weight > 0, kl_weight > 0 and draft_vocab > 0 need the verifier's LM head (lm_head)")
    train_idx, val_idx = _split(rows, config.split, config.val_fraction, config.seed)
    if config.unroll > 1:
        following = _following_rows(rows, tokens, train_idx)
    torch.manual_seed(config.seed)
    out_size = target.shape[1]
    adapter = BottleneckAdapter(draft.shape[1], config.bottleneck, out_size=out_size, input_norm=config.input_norm,
                                context_size=out_size if config.context else None)
    if norm_init is not None and config.input_norm:
        with torch.no_grad():
            adapter.norm.copy_(norm_init.float())
    head_weight = None
    if lm_head is not None:
        head_weight = (lm_head.weight if isinstance(lm_head, torch.nn.Module) else lm_head).detach().float()
        if head_weight.shape[1] != out_size:
            raise ValueError(f"lm_head reads hidden size {head_weight.shape[1]}, the verifier states have {out_size}")
        if int(tokens.max()) >= head_weight.shape[0]:
            raise ValueError(f"next_token holds id {int(tokens.max())}, beyond the LM head's {head_weight.shape[0]}")
        if config.draft_vocab:  # chosen from the training rows only: validation stays held out
            adapter.set_draft_vocab(frequent_tokens(tokens[train_idx], config.draft_vocab))
            index = torch.full((head_weight.shape[0],), -100, dtype=torch.long)
            index[adapter.draft_vocab] = torch.arange(len(adapter.draft_vocab))
            head_weight, tokens = adapter.draft_head(head_weight), index[tokens]
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    state = {"epoch": 0, "best_val": float("inf"), "best_epoch": -1, "stale": 0, "history": [], "best": None}
    checkpoint = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    if checkpoint and os.path.isfile(checkpoint):
        saved = torch.load(checkpoint, weights_only=False)
        if _trajectory(saved["config"]) != _trajectory(asdict(config)):
            raise ValueError(f"{checkpoint} was written with another TrainConfig; remove it to start over")
        adapter.load_state_dict(saved["adapter"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]

    def batch_loss(batch, batch_context):
        if following is None:
            return adapter_loss(adapter, draft[batch], target[batch], tokens[batch], config, head_weight,
                                batch_context)
        return _unrolled_loss(adapter, draft, target, tokens, context, following, batch, config, head_weight)

    def evaluate() -> float:
        adapter.eval()
        with torch.no_grad():
            total = 0.0
            for start in range(0, len(val_idx), 4096):
                part = val_idx[start: start + 4096]
                total += float(batch_loss(part, None if context is None else context[part])) * len(part)
            return total / len(val_idx)

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
            batch_context = None if context is None else context[batch]
            if previous is not None:
                batch_context = _self_context(adapter, draft, context, previous, batch, config.self_context,
                                              torch.Generator().manual_seed(config.seed * 7919 + epoch * 1009 + start))
            loss = batch_loss(batch, batch_context)
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
