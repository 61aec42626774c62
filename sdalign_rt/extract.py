"""Prefix-conditioned training pairs for the adapter: drafter and verifier states on the SAME committed text.

For each sample the verifier writes its greedy continuation; then both models read the committed text, each
in its own prompt (and with its own media), and for every continuation token j the extractor stores
  draft_hidden[j]:  the drafter's state at the token before j (its last hidden state, or layer k's raw
                    output with draft_layers=k),
  target_hidden[j]: the verifier's final (post-norm) state at the same point,
  context_hidden[j]: the verifier's final state one position earlier (zeros before the first token): what a
                    context-conditioned adapter reads beside the drafter's state (EAGLE's feature fusion),
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
ROW_KEYS = ("draft_hidden", "target_hidden", "context_hidden", "next_token")
# One-pass extractions may also keep, per row, the token the text really continued with ("fed_token": the sampled
# one where the verifier sampled; next_token stays its greedy choice, the drafter's label) and layer k's output for
# several k at once ("layer{k}_hidden"; load_pairs(draft_layers=k) serves one of them as draft_hidden).
FED_TOKEN = "fed_token"


def layer_key(k: int) -> str:
    return f"layer{k}_hidden"


@dataclass
class ExtractSample:
    id: str
    input_ids: torch.Tensor  # [1, P] verifier prompt
    target_inputs: dict = field(default_factory=dict)  # verifier media (pixel_values_videos, ...)
    draft_input_ids: torch.Tensor | None = None  # [1, P'] drafter prompt (default: the verifier's)
    draft_inputs: dict = field(default_factory=dict)  # drafter media (event_pixel_values, ...)
    continuation: torch.Tensor | None = None  # [1, n] the verifier's greedy continuation, if already generated


class ShardWriter:
    """Buffers rows and writes `shard_rows`-row safetensors shards; the manifest records finished samples."""

    def __init__(self, out_dir: str, shard_rows: int, meta: dict, settings: tuple = ()):
        """settings: further meta keys a resumed extraction must share where the stored manifest records them
        (manifests written before a key existed lack it)."""
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.shard_rows = out_dir, shard_rows
        path = os.path.join(out_dir, MANIFEST)
        if os.path.exists(path):
            with open(path) as f:
                self.manifest = json.load(f)
            stored = self.manifest["meta"]
            required = {key: stored.get(key) for key in ("draft_hidden_size", "target_hidden_size", "draft_layers")}
            recorded = {key: stored[key] for key in settings if key in stored}
            for key, value in {**required, **recorded}.items():
                if value != meta.get(key):
                    raise ValueError(f"{out_dir} holds an extraction with {key}={value}, not {meta.get(key)}: "
                                     "use another directory")
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
        keys = [key for key in self.pending[0] if key != "id"]  # the row keys the extraction keeps
        tensors = {key: torch.cat([p[key] for p in self.pending]).contiguous() for key in keys}
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


def _eos_ids(verifier) -> set:
    eos = getattr(getattr(verifier, "generation_config", None), "eos_token_id", None)
    return set([eos] if isinstance(eos, int) else (eos or []))


@torch.no_grad()
def generate_continuations(verifier, samples: list, max_new_tokens: int, batch_size: int = 1) -> None:
    """Fill each sample's `continuation` with the verifier's greedy continuation (up to and including its
    first EOS). Text-only samples go through generate in left-padded batches of batch_size (a batch's
    greedy text can differ from a lone prompt's where padding changes the rounding of a near tie; the
    rows stay prefix-conditioned either way); samples with media go one at a time."""
    eos = _eos_ids(verifier)
    todo = [s for s in samples if s.continuation is None]
    for sample in todo:
        if sample.input_ids.dim() != 2 or sample.input_ids.shape[0] != 1:
            raise ValueError(f"sample {sample.id!r}: input_ids must be one prompt [1, P], "
                             f"got {tuple(sample.input_ids.shape)}")
    text = [s for s in todo if not s.target_inputs] if batch_size > 1 else []
    batched = {id(s) for s in text}
    for sample in [s for s in todo if id(s) not in batched]:
        prompt = sample.input_ids
        full = verifier.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                 do_sample=False, **sample.target_inputs)
        sample.continuation = full[:, prompt.shape[1]:]
    pad = min(eos) if eos else 0
    for start in range(0, len(text), batch_size):
        chunk = text[start: start + batch_size]
        width = max(s.input_ids.shape[1] for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long, device=chunk[0].input_ids.device)
        mask = torch.zeros_like(ids)
        for row, sample in enumerate(chunk):
            ids[row, width - sample.input_ids.shape[1]:] = sample.input_ids[0]
            mask[row, width - sample.input_ids.shape[1]:] = 1
        full = verifier.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad)
        for row, sample in enumerate(chunk):
            new = full[row, width:].tolist()
            ends = [i for i, token in enumerate(new) if token in eos]
            new = new[: ends[0] + 1] if ends else new
            sample.continuation = torch.tensor([new], dtype=torch.long, device=ids.device)


def _draft_states(drafter, ids, media: dict, draft_layers: int | None) -> torch.Tensor:
    out = drafter(input_ids=ids, output_hidden_states=True, use_cache=False, **media)
    return out.hidden_states[draft_layers] if draft_layers is not None else out.hidden_states[-1]


@torch.no_grad()
def extract_pairs(drafter, verifier, samples: Iterable[ExtractSample], out_dir: str, *, max_new_tokens: int = 64,
                  draft_layers: int | None = None, shard_rows: int = 4096, vocab_map=None,
                  dtype: torch.dtype = torch.float16, batch_size: int = 1, progress: bool = True) -> dict:
    """Extract (draft_hidden, target_hidden, next_token) rows for every sample not already done in out_dir.

    Returns the manifest. `vocab_map` maps the verifier's continuation into the drafter's ids when their
    vocabularies differ. Hidden states are stored in `dtype`. Continuations are generated batch_size
    samples at a time (see generate_continuations); samples that carry one are not regenerated.
    """
    if draft_layers is not None:
        check_draft_layers(drafter, draft_layers)
    meta = {"draft_hidden_size": drafter.get_output_embeddings().weight.shape[1],
            "target_hidden_size": verifier.get_output_embeddings().weight.shape[1],
            "draft_layers": draft_layers, "max_new_tokens": max_new_tokens, "dtype": str(dtype).replace("torch.", "")}
    writer = ShardWriter(out_dir, shard_rows, meta)
    done = writer.done
    todo = [s for s in samples if s.id not in done]
    for index, sample in enumerate(tqdm(todo, desc="extract", unit="sample", disable=not progress)):
        if index % batch_size == 0:  # generate the next batch's continuations just before they are needed
            generate_continuations(verifier, todo[index: index + batch_size], max_new_tokens, batch_size)
        prompt, continuation = sample.input_ids, sample.continuation.to(sample.input_ids.device)
        full = torch.cat([prompt, continuation], dim=1)
        n = continuation.shape[1]
        if n == 0:
            writer.manifest["done"].append(sample.id)
            continue
        target = verifier(input_ids=full, output_hidden_states=True, use_cache=False, **sample.target_inputs)
        final = target.hidden_states[-1][0]
        target_hidden = final[prompt.shape[1] - 1: prompt.shape[1] - 1 + n]
        # One position earlier; a one-token prompt has nothing before its first state.
        shifted = torch.cat([final.new_zeros(1, final.shape[-1]), final])
        context_hidden = shifted[prompt.shape[1] - 1: prompt.shape[1] - 1 + n]
        draft_prompt = sample.draft_input_ids if sample.draft_input_ids is not None else prompt
        draft_continuation = vocab_map.draft_ids(continuation) if vocab_map is not None else continuation
        draft_full = torch.cat([draft_prompt, draft_continuation.to(draft_prompt.device)], dim=1)
        if drafter is verifier and sample.draft_input_ids is None and not sample.draft_inputs and vocab_map is None:
            # self-speculative (a model drafting from its own first layers): one forward serves both sides
            draft_hidden = target.hidden_states[draft_layers if draft_layers is not None else -1]
        else:
            draft_hidden = _draft_states(drafter, draft_full, sample.draft_inputs, draft_layers)
        start = draft_prompt.shape[1] - 1
        writer.add(sample.id, {"draft_hidden": draft_hidden[0, start: start + n].to("cpu", dtype),
                               "target_hidden": target_hidden.to("cpu", dtype),
                               "context_hidden": context_hidden.to("cpu", dtype),
                               "next_token": continuation[0].to("cpu", torch.long)})
    writer.flush()
    return writer.manifest


def load_pairs(out_dir: str, draft_layers: int | None = None) -> dict:
    """All extracted rows of out_dir: {"draft_hidden", "target_hidden", "context_hidden" (extractions made before it
    existed lack it), "next_token", "fed_token" (one-pass extractions), "sample" (the row's sample number, in
    extraction order; rows of a sample are consecutive continuation positions), "sample_ids" (sample number ->
    the sample's id), "meta"}. An extraction that kept
    several drafter depths serves the one draft_layers names as draft_hidden (and loads no other)."""
    from safetensors.torch import load_file

    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{out_dir!r} has no {MANIFEST}: run sdalign-rt extract first")
    with open(path) as f:
        manifest = json.load(f)
    parts = [load_file(os.path.join(out_dir, shard["file"])) for shard in manifest["shards"]]
    if not parts:
        raise ValueError(f"{out_dir!r} holds no extracted rows")
    layers = manifest["meta"].get("draft_layers")
    keys = ROW_KEYS + (FED_TOKEN,)
    rename = {}
    if isinstance(layers, list):
        if draft_layers not in layers:
            raise ValueError(f"{out_dir!r} holds drafter states of layers {layers}: pass draft_layers= one of them, "
                             f"got {draft_layers!r}")
        keys, rename = keys + (layer_key(draft_layers),), {layer_key(draft_layers): "draft_hidden"}
    elif draft_layers is not None and layers is not None and draft_layers != layers:
        raise ValueError(f"{out_dir!r} holds drafter states of layer {layers}, not {draft_layers}")
    rows = {rename.get(key, key): torch.cat([p[key] for p in parts]) for key in keys if all(key in p for p in parts)}
    counts = [n for shard in manifest["shards"] for n in shard["sample_rows"]]
    sample = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
    ids = [i for shard in manifest["shards"] for i in shard["samples"]]
    return {**rows, "sample": sample, "sample_ids": ids, "meta": manifest["meta"]}


@torch.no_grad()
def extract_self_pairs(model, samples: list, out_dir: str, *, draft_layers, max_new_tokens: int = 64,
                       batch_size: int = 32, shard_rows: int = 4096, dtype: torch.dtype = torch.float16,
                       temperature: float = 0.0, top_p: float | None = None, seed: int = 0,
                       progress: bool = True) -> dict:
    """extract_pairs for a self-speculative pair (the model drafts from its own first draft_layers layers), in
    one pass: the model decodes each batch of text prompts through the runtime's own runner, and the states
    every step computes anyway are the rows (layer k's output, the final state, the one before, the token the
    final state predicts greedily). No second forward over the text, no continuation cache; a row's
    continuation ends at its first EOS. Batches are the resume unit.

    draft_layers: an int, or a sequence of depths kept side by side ("layer{k}_hidden", one pass for a sweep
    over k; load_pairs(draft_layers=k) picks one). temperature > 0: the text continues with a token sampled as
    users sample (temperature, then top_p; seeded per batch), while next_token stays the greedy choice at every
    position: the label a drafter of greedy decoding learns, on text that wanders where sampling users go."""
    from sdalign_rt.sampling import check_sampling_args
    from sdalign_rt.shallow import decoder_layers, final_norm

    several = not isinstance(draft_layers, int)
    depths = sorted(set(draft_layers)) if several else [draft_layers]
    if not depths:
        raise ValueError("draft_layers is empty")
    for k in depths:
        check_draft_layers(model, k)
    if temperature:
        check_sampling_args(temperature, None, top_p)
    width = model.get_output_embeddings().weight.shape[1]
    meta = {"draft_hidden_size": width, "target_hidden_size": width, "draft_layers": depths if several else depths[0],
            "max_new_tokens": max_new_tokens, "dtype": str(dtype).replace("torch.", ""), "one_pass": True,
            "temperature": temperature, "top_p": top_p, "seed": seed}
    writer = ShardWriter(out_dir, shard_rows, meta,
                         settings=("max_new_tokens", "dtype", "temperature", "top_p", "seed"))
    position = {id(s): i for i, s in enumerate(samples)}
    todo = [s for s in samples if s.id not in writer.done]
    for sample in samples:
        if sample.target_inputs or sample.draft_inputs or sample.draft_input_ids is not None:
            raise ValueError(f"sample {sample.id!r}: one-pass extraction takes text prompts of one model only")
    eos = _eos_ids(model)
    captured = {}
    # Layer k's output is what the next layer's input norm (or, for k = all, the final norm) reads.
    layers = decoder_layers(model)
    handles = []
    for k in depths:
        tap = layers[k].input_layernorm if k < len(layers) else final_norm(model)
        handles.append(tap.register_forward_pre_hook(
            lambda module, args, k=k: captured.__setitem__(k, args[0])))
    keys = {k: layer_key(k) if several else "draft_hidden" for k in depths}
    try:
        for start in tqdm(range(0, len(todo), batch_size), desc="distil", unit="batch", disable=not progress):
            chunk = todo[start: start + batch_size]
            generator = None
            if temperature:  # seeded by the batch's first sample: a resumed run draws what an unbroken one would
                generator = torch.Generator(device=chunk[0].input_ids.device)
                generator.manual_seed(seed * 1_000_003 + position[id(chunk[0])])
            sampling = (temperature, top_p, generator) if temperature else None
            for sample, rows in zip(chunk, _distil_batch(model, chunk, max_new_tokens, eos, captured, keys,
                                                         sampling)):
                writer.add(sample.id, {key: value.to("cpu", dtype) if value.is_floating_point() else value.cpu()
                                       for key, value in rows.items()})
    finally:
        for handle in handles:
            handle.remove()
    writer.flush()
    return writer.manifest


def _distil_batch(model, chunk, max_new_tokens: int, eos: set, captured: dict, keys: dict, sampling=None):
    """Decode one left-padded batch (greedily, or sampling (temperature, top_p, generator)); per sample the rows
    {keys[k] for each drafter depth k, target_hidden, context_hidden, next_token, fed_token}."""
    from sdalign_rt.kv_cache import additive
    from sdalign_rt.model_runner import ModelRunner, new_cache
    from sdalign_rt.sampling import warped_probs

    lengths = [s.input_ids.shape[1] for s in chunk]
    width, device = max(lengths), chunk[0].input_ids.device
    pad = min(eos) if eos else 0
    ids = torch.full((len(chunk), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, sample in enumerate(chunk):
        ids[row, width - lengths[row]:] = sample.input_ids[0]
        mask[row, width - lengths[row]:] = 1
    runner = ModelRunner(model, new_cache(model, len(chunk), width + max_new_tokens + 2))
    cache = runner.cache
    final = runner.prefill(ids, mask, last_only=False)  # [B, P, D]
    previous = torch.cat([final.new_zeros(len(chunk), 1, final.shape[-1]), final], dim=1)[:, -2]
    for row, n in enumerate(lengths):  # a one-token prompt has nothing before its last state
        if n == 1:
            previous[row] = 0
    state = final[:, -1]
    layer = {k: captured[k][:, -1] for k in keys}
    eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    names = tuple(keys.values()) + ("target_hidden", "context_hidden", "next_token", FED_TOKEN)
    rows = {key: [] for key in names}
    alive = torch.ones(len(chunk), dtype=torch.bool, device=device)
    alive_steps = []
    own = additive(torch.ones(1, 1, 1, dtype=torch.bool, device=device), cache.dtype)
    for _ in range(max_new_tokens):
        logits = runner.logits(state)
        token = logits.argmax(-1)
        fed = token
        if sampling is not None:
            temperature, top_p, generator = sampling
            fed = torch.multinomial(warped_probs(logits, temperature, None, top_p), 1, generator=generator)[:, 0]
        for key, value in zip(names, [layer[k] for k in keys] + [state, previous, token, fed]):
            rows[key].append(value)
        alive_steps.append(alive.clone())
        alive = alive & ~torch.isin(fed, eos_ids)  # a row's rows end with the first EOS its text takes
        if not bool(alive.any()):
            break
        hidden = runner.forward(runner.embed(fed[:, None]), cache.next_positions()[:, None],
                                cache.lengths[:, None], cache.attention_bias(own, cache.lengths))
        cache.lengths += 1
        cache.refresh_bias()
        previous, state = state, hidden[:, -1]
        layer = {k: captured[k][:, -1] for k in keys}
    steps = torch.stack(alive_steps, 1)  # [B, steps]: the rows each sample keeps (through its first EOS)
    stacked = {key: torch.stack(values, 1) for key, values in rows.items()}
    return [{key: value[row][steps[row]] for key, value in stacked.items()} for row in range(len(chunk))]
