"""Prefix-conditioned training pairs for the adapter: drafter and verifier states on the SAME committed text.

For each sample the verifier writes its greedy continuation; then both models read the committed text, each
in its own prompt (and with its own media), and for every continuation token j the extractor stores
  draft_hidden[j]:  the drafter's state at the token before j (its last hidden state, or layer k's raw
                    output with draft_layers=k),
  target_hidden[j]: the verifier's final (post-norm) state at the same point,
  next_token[j]:    token j itself, in the verifier's ids,
so position t predicts token t + 1 on both sides: no free-running second generation, no off-by-one.

Rows are written as safetensors shards of at most `shard_rows` rows (bounded memory) with a manifest that
lists finished samples, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable

import torch
from tqdm import tqdm

from sdalign_rt.shallow import check_draft_layers

MANIFEST = "manifest.json"


@dataclass
class ExtractSample:
    id: str
    input_ids: torch.Tensor  # [1, P] verifier prompt
    target_inputs: dict = field(default_factory=dict)  # verifier media (pixel_values_videos, ...)
    draft_input_ids: torch.Tensor | None = None  # [1, P'] drafter prompt (default: the verifier's)
    draft_inputs: dict = field(default_factory=dict)  # drafter media (event_pixel_values, ...)


class ShardWriter:
    """Buffers rows and writes `shard_rows`-row safetensors shards; the manifest records finished samples."""

    def __init__(self, out_dir: str, shard_rows: int, meta: dict):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.shard_rows = out_dir, shard_rows
        path = os.path.join(out_dir, MANIFEST)
        if os.path.exists(path):
            with open(path) as f:
                self.manifest = json.load(f)
            for key in ("draft_hidden_size", "target_hidden_size", "draft_layers"):
                if self.manifest["meta"].get(key) != meta.get(key):
                    raise ValueError(f"{out_dir} holds an extraction with {key}={self.manifest['meta'].get(key)}, "
                                     f"not {meta.get(key)}: use another directory")
        else:
            self.manifest = {"meta": meta, "shards": [], "done": []}
        self.pending: list[dict] = []  # per sample: its rows, kept until a shard takes them
        self.pending_rows = 0

    @property
    def done(self) -> set:
        return set(self.manifest["done"])

    def add(self, sample_id: str, rows: dict) -> None:
        self.pending.append({"id": sample_id, **rows})
        self.pending_rows += len(rows["next_token"])
        if self.pending_rows >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered samples as one shard, then record them as done (so a crash mid-write redoes them)."""
        if not self.pending:
            return
        from safetensors.torch import save_file

        name = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        tensors = {key: torch.cat([p[key] for p in self.pending]).contiguous()
                   for key in ("draft_hidden", "target_hidden", "next_token")}
        save_file(tensors, os.path.join(self.out_dir, name))
        self.manifest["shards"].append({"file": name, "rows": int(tensors["next_token"].shape[0]),
                                        "samples": [p["id"] for p in self.pending],
                                        "sample_rows": [int(len(p["next_token"])) for p in self.pending]})
        self.manifest["done"].extend(p["id"] for p in self.pending)
        tmp = os.path.join(self.out_dir, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.manifest, f, indent=1)
        os.replace(tmp, os.path.join(self.out_dir, MANIFEST))  # atomic: the manifest never names a missing shard
        self.pending, self.pending_rows = [], 0


def _draft_states(drafter, ids, media: dict, draft_layers: int | None) -> torch.Tensor:
    out = drafter(input_ids=ids, output_hidden_states=True, use_cache=False, **media)
    return out.hidden_states[draft_layers] if draft_layers is not None else out.hidden_states[-1]


@torch.no_grad()
def extract_pairs(drafter, verifier, samples: Iterable[ExtractSample], out_dir: str, *, max_new_tokens: int = 64,
                  draft_layers: int | None = None, shard_rows: int = 4096, vocab_map=None,
                  dtype: torch.dtype = torch.float16, progress: bool = True) -> dict:
    """Extract (draft_hidden, target_hidden, next_token) rows for every sample not already done in out_dir.

    Returns the manifest. `vocab_map` maps the verifier's continuation into the drafter's ids when their
    vocabularies differ. Hidden states are stored in `dtype`.
    """
    if draft_layers is not None:
        check_draft_layers(drafter, draft_layers)
    meta = {"draft_hidden_size": drafter.get_output_embeddings().weight.shape[1],
            "target_hidden_size": verifier.get_output_embeddings().weight.shape[1],
            "draft_layers": draft_layers, "max_new_tokens": max_new_tokens, "dtype": str(dtype).replace("torch.", "")}
    writer = ShardWriter(out_dir, shard_rows, meta)
    done = writer.done
    samples = list(samples)
    for sample in tqdm([s for s in samples if s.id not in done], desc="extract", unit="sample", disable=not progress):
        prompt = sample.input_ids
        if prompt.dim() != 2 or prompt.shape[0] != 1:
            raise ValueError(f"sample {sample.id!r}: input_ids must be one prompt [1, P], got {tuple(prompt.shape)}")
        full = verifier.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                 do_sample=False, **sample.target_inputs)
        continuation = full[:, prompt.shape[1]:]
        n = continuation.shape[1]
        if n == 0:
            writer.manifest["done"].append(sample.id)
            continue
        target = verifier(input_ids=full, output_hidden_states=True, use_cache=False, **sample.target_inputs)
        target_hidden = target.hidden_states[-1][0, prompt.shape[1] - 1: prompt.shape[1] - 1 + n]
        draft_prompt = sample.draft_input_ids if sample.draft_input_ids is not None else prompt
        draft_continuation = vocab_map.draft_ids(continuation) if vocab_map is not None else continuation
        draft_full = torch.cat([draft_prompt, draft_continuation.to(draft_prompt.device)], dim=1)
        draft_hidden = _draft_states(drafter, draft_full, sample.draft_inputs, draft_layers)
        start = draft_prompt.shape[1] - 1
        writer.add(sample.id, {"draft_hidden": draft_hidden[0, start: start + n].to("cpu", dtype),
                               "target_hidden": target_hidden.to("cpu", dtype),
                               "next_token": continuation[0].to("cpu", torch.long)})
    writer.flush()
    return writer.manifest


def load_pairs(out_dir: str) -> dict:
    """All extracted rows of out_dir: {"draft_hidden", "target_hidden", "next_token", "sample" (the row's sample
    number, in extraction order; rows of a sample are consecutive continuation positions), "meta"}."""
    from safetensors.torch import load_file

    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{out_dir!r} has no {MANIFEST}: run sdalign-rt extract first")
    with open(path) as f:
        manifest = json.load(f)
    parts = [load_file(os.path.join(out_dir, shard["file"])) for shard in manifest["shards"]]
    if not parts:
        raise ValueError(f"{out_dir!r} holds no extracted rows")
    rows = {key: torch.cat([p[key] for p in parts]) for key in ("draft_hidden", "target_hidden", "next_token")}
    counts = [n for shard in manifest["shards"] for n in shard["sample_rows"]]
    sample = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
    return {**rows, "sample": sample, "meta": manifest["meta"]}
