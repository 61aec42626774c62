"""The embedded default, end to end: SmolLM2-135M-Instruct verifies drafts from its own first k layers, mapped by
a BottleneckAdapter trained with the alignment pipeline on the verifier's own generations.

  continuations  the verifier's greedy answers to the training prompts (batched, cached, resumable);
  adapter        extract (layer-k states, final states, next tokens) → train-adapter (input norm, reduced
                 draft vocabulary, CE through the verifier's head) → held-out alignment report; cached per k;
  measure        the fixed held-out prompt set, one prompt at a time: the verifier alone (HF generate, greedy)
                 and SpeculativeDecoder(draft_layers=k), timed, outputs compared token by token.

Everything lands in a cache directory (SDALIGN_RT_CACHE, default ~/.cache/sdalign_rt), so a second run only
measures. `run_demo` serves `sdalign-rt demo`, `sweep_depth` serves `sdalign-rt sweep-depth`.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

from sdalign_rt.demo import prompts as demo_prompts
from sdalign_rt.demo import smollm2
from sdalign_rt.shallow import final_norm, num_decoder_layers

# Picked by `sdalign-rt sweep-depth` on the embedded default (bench/results/sweep_depth_cpu.json): the depth with
# the best measured speedup on CPU.
DEFAULT_DRAFT_LAYERS = 2


@dataclass
class DemoConfig:
    draft_layers: int = DEFAULT_DRAFT_LAYERS
    tree: str = "static:[[0],[1],[2],[0,0],[1,0],[0,1],[0,0,0],[0,0,0,0]]"  # 8 drafts: as cheap to verify as 3 on CPU
    dtype: str = "float32"  # float32: greedy outputs match the verifier's bit for bit (see README, bf16)
    max_new_tokens: int = 128  # per evaluation prompt
    train_new_tokens: int = 96  # per training prompt
    generation_batch: int = 32
    bottleneck: int = 256
    draft_vocab: int = 8192
    epochs: int = 30  # early stopping (patience 3) usually ends it sooner
    seed: int = 0
    eval_prompts: int = 12  # how many of the fixed held-out prompts to run
    train_prompts: int = 0  # how many training prompts to distil (0: all)


def load_model(path: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    return model, AutoTokenizer.from_pretrained(path)


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    """[1, P] token ids of one user turn in the model's chat template, ready for the assistant's answer."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def training_samples(model, tokenizer, cache_dir: str, config: DemoConfig, progress: bool = True):
    """ExtractSamples of the training prompts with the verifier's greedy continuations, generated in batches
    once and cached (saved after every batch, so an interrupted run resumes)."""
    from sdalign_rt.extract import ExtractSample, generate_continuations

    path = os.path.join(cache_dir, f"continuations-{config.dtype}-{config.train_new_tokens}.pt")
    done = torch.load(path) if os.path.isfile(path) else {}
    samples = [ExtractSample(id=str(i), input_ids=chat_ids(tokenizer, p), continuation=done.get(str(i)))
               for i, p in enumerate(_train_prompts(config))]
    todo = [s for s in samples if s.continuation is None]
    batch = config.generation_batch
    for start in tqdm(range(0, len(todo), batch), desc="verifier continuations", unit="batch", disable=not progress):
        chunk = todo[start: start + batch]
        generate_continuations(model, chunk, config.train_new_tokens, batch_size=batch)
        done.update({s.id: s.continuation for s in chunk})
        os.makedirs(cache_dir, exist_ok=True)
        torch.save(done, path + ".tmp")
        os.replace(path + ".tmp", path)
    return samples


def _train_prompts(config: DemoConfig) -> list[str]:
    prompts = demo_prompts.train_prompts()
    return prompts[: config.train_prompts] if config.train_prompts else prompts


def _adapter_dir(cache_dir: str, config: DemoConfig, k: int) -> str:
    return os.path.join(cache_dir, f"adapter-k{k}-{config.dtype}-p{len(_train_prompts(config))}-"
                                   f"n{config.train_new_tokens}-r{config.bottleneck}-v{config.draft_vocab}-"
                                   f"e{config.epochs}-s{config.seed}")


def prepare_adapter(model, tokenizer, k: int, cache_dir: str, config: DemoConfig, progress: bool = True):
    """The trained adapter for draft_layers=k (trained now unless cached) and its held-out alignment report."""
    from sdalign_rt.adapter import WEIGHTS_NAME, BottleneckAdapter
    from sdalign_rt.eval_alignment import evaluate_alignment
    from sdalign_rt.extract import extract_pairs, load_pairs
    from sdalign_rt.train_adapter import TrainConfig, held_out_rows, train_adapter

    out = _adapter_dir(cache_dir, config, k)
    report_path = os.path.join(out, "alignment.json")
    if os.path.isfile(os.path.join(out, WEIGHTS_NAME)) and os.path.isfile(report_path):
        with open(report_path) as f:
            return BottleneckAdapter.from_pretrained(out, dtype=model.dtype), json.load(f)
    samples = training_samples(model, tokenizer, cache_dir, config, progress)
    pairs = os.path.join(cache_dir, f"pairs-k{k}-{config.dtype}-p{len(samples)}-n{config.train_new_tokens}")
    extract_pairs(model, model, samples, pairs, max_new_tokens=config.train_new_tokens, draft_layers=k,
                  dtype=torch.float32, progress=progress)
    rows = load_pairs(pairs)
    train = TrainConfig(bottleneck=config.bottleneck, epochs=config.epochs, ce_weight=1.0, input_norm=True,
                        draft_vocab=config.draft_vocab, patience=3, seed=config.seed)
    adapter, log = train_adapter(rows, train, out_dir=out, lm_head=model.get_output_embeddings(),
                                 norm_init=final_norm(model).weight.detach(), progress=progress)
    held = held_out_rows(rows, train.val_fraction, train.seed)
    report = evaluate_alignment(adapter, held, model.get_output_embeddings(), gamma=3)
    report["training"] = {key: log[key] for key in ("rows", "initial_val_loss", "best_val_loss", "epochs_run")}
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2)
    return adapter.to(dtype=model.dtype), report


@torch.no_grad()
def measure(model, tokenizer, adapter, k: int, config: DemoConfig, progress: bool = True) -> dict:
    """Verifier alone vs speculative decoding on the held-out prompts, one prompt at a time (batch 1)."""
    import sdalign_rt as sd

    decoder = sd.SpeculativeDecoder(model, model, adapter=adapter, tree=sd.TreeSpec.parse(config.tree),
                                    draft_layers=k)
    prompts = demo_prompts.eval_prompts()[: config.eval_prompts]
    warm = chat_ids(tokenizer, "Hello!")  # first calls pay one-off allocation and dispatch costs
    model.generate(warm, max_new_tokens=8, do_sample=False)
    decoder.generate(warm, 8)
    totals = {"baseline_s": 0.0, "spec_s": 0.0, "tokens": 0, "steps": 0, "row_steps": 0, "accepted": 0,
              "draft_s": 0.0, "verify_forward_s": 0.0, "bookkeeping_s": 0.0}
    per_position = [0.0] * decoder.tree.depth
    per_prompt = []
    for prompt in tqdm(prompts, desc=f"measure k={k}", unit="prompt", disable=not progress):
        ids = chat_ids(tokenizer, prompt)
        start = time.perf_counter()
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=config.max_new_tokens,
                                  do_sample=False)
        baseline_s = time.perf_counter() - start
        start = time.perf_counter()
        out = decoder.generate(ids, config.max_new_tokens, attention_mask=torch.ones_like(ids))
        spec_s = time.perf_counter() - start
        identical = out.sequences.shape == expected.shape and torch.equal(out.sequences, expected)
        stats = out.stats
        new = int(expected.shape[1] - ids.shape[1])
        totals["baseline_s"] += baseline_s
        totals["spec_s"] += spec_s
        totals["tokens"] += new
        for key in ("steps", "row_steps", "accepted"):
            totals[key] += stats[key]
        for key in ("draft_s", "verify_forward_s", "bookkeeping_s"):
            totals[key] += stats["timings"][key]
        per_position = [a + b * stats["row_steps"] for a, b in zip(per_position, stats["per_position_acceptance"])]
        per_prompt.append({"prompt": prompt, "identical": identical, "new_tokens": new,
                           "tokens_per_s_baseline": new / baseline_s, "tokens_per_s_spec": new / spec_s,
                           "mean_accepted": stats["mean_accepted"], "acceptance_rate": stats["acceptance_rate"],
                           "text": tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)})
    rows = max(totals["row_steps"], 1)
    depth = decoder.tree.depth
    verifier_token_s = totals["baseline_s"] / max(totals["tokens"], 1)
    draft_token_s = totals["draft_s"] / max(rows * depth, 1)
    return {
        "lossless": all(p["identical"] for p in per_prompt),
        "speedup": totals["baseline_s"] / totals["spec_s"],
        "tokens_per_s_baseline": totals["tokens"] / totals["baseline_s"],
        "tokens_per_s_spec": totals["tokens"] / totals["spec_s"],
        "acceptance_rate": totals["accepted"] / (rows * depth),
        "token_acceptance": _token_acceptance(per_position, rows),
        "mean_accepted": (totals["accepted"] + rows) / rows,
        "per_position_acceptance": [c / rows for c in per_position],
        "draft_layers": k, "num_layers": num_decoder_layers(model), "tree": config.tree,
        "draft_token_ms": 1e3 * draft_token_s, "verifier_token_ms": 1e3 * verifier_token_s,
        "draft_cost_ratio": draft_token_s / verifier_token_s,
        "timings_s": {key: totals[key] for key in ("baseline_s", "spec_s", "draft_s", "verify_forward_s",
                                                   "bookkeeping_s")},
        "steps": totals["steps"], "new_tokens": totals["tokens"], "prompts": per_prompt,
    }


def _token_acceptance(per_position_counts: list, row_steps: int) -> float:
    """Per-draft acceptance a of the chain model E[tokens] = (1 - a^(g+1)) / (1 - a): drafts accepted over
    drafts the verifier reached (a draft is reached when every draft before it was accepted)."""
    accepted = sum(per_position_counts)
    reached = row_steps + sum(per_position_counts[:-1])
    return accepted / max(reached, 1)


def environment() -> dict:
    import platform

    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": cpu_name()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def run_demo(config: DemoConfig, cache_dir: str | None = None, progress: bool = True,
             checkpoint: str | None = None) -> dict:
    """checkpoint: another causal LM directory (model + tokenizer with a chat template) in SmolLM2's place."""
    cache_dir = cache_dir or smollm2.default_cache_dir()
    model, tokenizer = load_model(checkpoint or smollm2.checkpoint(cache_dir), config.dtype)
    adapter, alignment = prepare_adapter(model, tokenizer, config.draft_layers, cache_dir, config, progress)
    result = measure(model, tokenizer, adapter, config.draft_layers, config, progress)
    result["adapter_cosine"] = alignment["cosine"]["mean"]
    result["alignment"] = {key: alignment.get(key) for key in ("rows", "cosine", "top1_agreement", "top5_agreement",
                                                               "top1_agreement_draft_vocab", "draft_vocab_coverage",
                                                               "training")}
    result["config"] = asdict(config)
    result["environment"] = environment()
    return result


def sweep_depth(depths: list[int], config: DemoConfig, cache_dir: str | None = None, progress: bool = True,
                checkpoint: str | None = None) -> dict:
    """For each k: train (or reuse) its adapter, measure alpha, tau, draft cost and speedup; pick the best k."""
    cache_dir = cache_dir or smollm2.default_cache_dir()
    model, tokenizer = load_model(checkpoint or smollm2.checkpoint(cache_dir), config.dtype)
    rows = []
    for k in depths:
        adapter, alignment = prepare_adapter(model, tokenizer, k, cache_dir, config, progress)
        result = measure(model, tokenizer, adapter, k, replace(config, draft_layers=k), progress)
        rows.append({key: result[key] for key in ("draft_layers", "lossless", "acceptance_rate", "token_acceptance",
                                                  "mean_accepted", "draft_token_ms", "verifier_token_ms",
                                                  "draft_cost_ratio", "speedup", "tokens_per_s_baseline",
                                                  "tokens_per_s_spec", "per_position_acceptance")}
                    | {"adapter_cosine": alignment["cosine"]["mean"], "top1_agreement": alignment["top1_agreement"],
                       "top1_agreement_draft_vocab": alignment.get("top1_agreement_draft_vocab")})
    best = max(rows, key=lambda row: row["speedup"])
    return {"best_draft_layers": best["draft_layers"], "rows": rows, "config": asdict(config),
            "environment": environment()}


def write_demo(result: dict, path: str) -> None:
    """JSON at path and a PNG beside it: acceptance by draft position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    fig, ax = plt.subplots(figsize=(6, 4))
    rates = result["per_position_acceptance"]
    ax.bar(range(1, len(rates) + 1), rates)
    ax.set_xlabel("draft position")
    ax.set_ylabel("share of steps that accepted it")
    ax.set_ylim(0, 1)
    ax.set_title(f"SmolLM2 draft_layers={result['draft_layers']}: speedup {result['speedup']:.2f}x, "
                 f"tau {result['mean_accepted']:.2f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.splitext(path)[0] + ".png", dpi=110)
    plt.close(fig)


def write_sweep(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    ks = [row["draft_layers"] for row in result["rows"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(ks, [row["token_acceptance"] for row in result["rows"]], "o-", label="per-draft acceptance a")
    left.plot(ks, [row["acceptance_rate"] for row in result["rows"]], "s-", label="alpha (accepted / depth)")
    left.plot(ks, [row["draft_cost_ratio"] for row in result["rows"]], "^-", label="draft cost / verifier token")
    left.set_xlabel("draft_layers k")
    left.legend(fontsize=8)
    right.plot(ks, [row["speedup"] for row in result["rows"]], "o-")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_xlabel("draft_layers k")
    right.set_ylabel("measured speedup (wall clock)")
    fig.suptitle(f"SmolLM2-135M self-speculative sweep: best k = {result['best_draft_layers']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.splitext(path)[0] + ".png", dpi=110)
    plt.close(fig)
