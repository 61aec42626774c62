"""The embedded default, end to end: SmolLM2-135M-Instruct verifies drafts from its own first k layers, mapped by
a BottleneckAdapter trained with the alignment pipeline on the verifier's own generations.

  adapter   one-pass distillation (the verifier's greedy answers to the training prompts, decoded in batches
            through the runtime, their states kept as they go) -> train-adapter (input norm, reduced draft
            vocabulary, CE through the verifier's head, optionally conditioned on the verifier's previous
            state) -> held-out alignment report; cached per setting, resumable;
  tree      planned from this machine's measured costs and acceptance calibrated on prompts of their own
            (tree_planner), cached beside the adapter;
  measure   on the held-out prompts, interleaved and repeated: HF generate (greedy), HF prompt lookup, HF
            assisted decoding with its own first k layers (assistant_early_exit), our one-token decode and our
            speculative decode, each checked token for token against HF generate; then feature mode's
            thresholds (lossy: speedup, tau, tokens that differ from greedy).

Everything lands in a cache directory (SDALIGN_RT_CACHE, default ~/.cache/sdalign_rt), so a second run only
measures. `run_demo` serves `sdalign-rt demo`, `compare_adapters` serves `sdalign-rt compare-adapters`.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

from sdalign_rt.demo import prompts as demo_prompts
from sdalign_rt.demo import smollm2
from sdalign_rt.shallow import final_norm, num_decoder_layers
from sdalign_rt.plotting import pyplot

# Picked by `sdalign-rt compare-adapters` on the embedded default (bench/results/adapters_cpu.json).
DEFAULT_DRAFT_LAYERS = 2
PEERS = ("hf_generate", "hf_prompt_lookup", "hf_early_exit", "ours_one_token", "ours_speculative")


@dataclass
class DemoConfig:
    draft_layers: int = DEFAULT_DRAFT_LAYERS
    tree: str = "plan"  # "plan": planned from measured costs and cached; or a TreeSpec string ("chain:3", ...)
    dtype: str = "float32"  # float32: greedy outputs observed identical to the verifier's (bf16 may flip near-ties)
    max_new_tokens: int = 48  # per evaluation prompt (--full: 96)
    train_new_tokens: int = 96  # per training prompt
    generation_batch: int = 32
    bottleneck: int = 256
    draft_vocab: int = 8192
    context: bool = True  # the adapter also reads the verifier's previous state (EAGLE-style fusion)
    self_context: float = 0.0  # share of training rows that read the adapter's own prediction of that state
    epochs: int = 30  # early stopping (patience 3) usually ends it sooner
    seed: int = 0
    eval_prompts: int = 3  # how many of the fixed held-out prompts to run (--full: 6)
    train_prompts: int = 936  # how many training prompts to distil (0: all 1248)
    rounds: int = 2  # interleaved repetitions of every peer; speedups are medians over rounds (--full: 3)
    plan_max_nodes: int = 8
    plan_max_depth: int = 5
    feature_thresholds: tuple = (0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


# The published figures' measurement (sdalign-rt demo --full): more prompts, longer answers, more rounds.
FULL = dict(eval_prompts=6, max_new_tokens=96, rounds=3)

# The adapter and tree plan the package ships for the default configuration (provenance.json says how they were
# made and which command rebuilds them), so that a default run trains and plans nothing.
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped")


def shipped_provenance() -> dict | None:
    path = os.path.join(SHIPPED, "provenance.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def shipped_adapter_dir(config: DemoConfig) -> str | None:
    """The shipped adapter's folder when `config` trains exactly what it was trained with, else None."""
    provenance = shipped_provenance()
    k = config.draft_layers
    if provenance is None or provenance["adapter_dir"] != os.path.basename(_adapter_dir("", config, k)):
        return None
    return SHIPPED


def load_model(path: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    return model, AutoTokenizer.from_pretrained(path)


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    """[1, P] token ids of one user turn in the model's chat template, ready for the assistant's answer."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def _train_prompts(config: DemoConfig) -> list[str]:
    prompts = demo_prompts.train_prompts()
    return prompts[: config.train_prompts] if config.train_prompts else prompts


def _pairs_dir(cache_dir: str, config: DemoConfig, k: int) -> str:
    """One distillation per k, dtype and length; more training prompts extend it (they are distilled in order)."""
    return os.path.join(cache_dir, f"distil-k{k}-{config.dtype}-n{config.train_new_tokens}")


def _adapter_dir(cache_dir: str, config: DemoConfig, k: int) -> str:
    return os.path.join(cache_dir, f"adapter-k{k}-{config.dtype}-p{len(_train_prompts(config))}-"
                                   f"n{config.train_new_tokens}-r{config.bottleneck}-v{config.draft_vocab}-"
                                   f"c{int(config.context)}-e{config.epochs}-s{config.seed}"
                                   + (f"-sc{config.self_context:g}" if config.self_context else ""))


def distilled_rows(model, tokenizer, k: int, cache_dir: str, config: DemoConfig, progress: bool = True) -> dict:
    """The training rows of the first train_prompts prompts (distilled now where missing)."""
    from sdalign_rt.extract import ExtractSample, extract_self_pairs, load_pairs

    prompts = _train_prompts(config)
    samples = [ExtractSample(id=str(i), input_ids=chat_ids(tokenizer, p)) for i, p in enumerate(prompts)]
    pairs = _pairs_dir(cache_dir, config, k)
    extract_self_pairs(model, samples, pairs, draft_layers=k, max_new_tokens=config.train_new_tokens,
                       batch_size=config.generation_batch, dtype=torch.float32, progress=progress)
    rows = load_pairs(pairs)
    keep = rows["sample"] < len(prompts)  # an extraction made for more prompts also serves fewer
    return {key: (value[keep] if isinstance(value, torch.Tensor) else value) for key, value in rows.items()}


def prepare_adapter(model, tokenizer, k: int, cache_dir: str, config: DemoConfig, progress: bool = True,
                    retrain: bool = False, use_shipped: bool = True):
    """The trained adapter for draft_layers=k and its held-out alignment report: the cached one (what --retrain built
    on this machine), else the shipped one where the config matches it, else trained now (distilling what is
    missing). retrain: ignore the shipped
    and cached adapters and the distilled rows, and rebuild them through the pipeline. use_shipped=False for
    another model than SmolLM2 (the shipped adapter is SmolLM2's)."""
    import shutil

    from sdalign_rt.adapter import WEIGHTS_NAME, BottleneckAdapter
    from sdalign_rt.eval_alignment import evaluate_alignment
    from sdalign_rt.train_adapter import TrainConfig, held_out_rows, train_adapter

    out = _adapter_dir(cache_dir, config, k)
    if retrain:
        for stale in (out, _pairs_dir(cache_dir, config, k)):
            shutil.rmtree(stale, ignore_errors=True)
    shipped = None if retrain or not use_shipped else shipped_adapter_dir(config)
    for folder in (out, shipped):
        report_path = os.path.join(folder, "alignment.json") if folder else ""
        if folder and os.path.isfile(os.path.join(folder, WEIGHTS_NAME)) and os.path.isfile(report_path):
            with open(report_path) as f:
                return BottleneckAdapter.from_pretrained(folder, dtype=model.dtype), json.load(f)
    report_path = os.path.join(out, "alignment.json")
    rows = distilled_rows(model, tokenizer, k, cache_dir, config, progress)
    train = TrainConfig(bottleneck=config.bottleneck, epochs=config.epochs, ce_weight=1.0, input_norm=True,
                        draft_vocab=config.draft_vocab, context=config.context, self_context=config.self_context,
                        patience=3, seed=config.seed)
    adapter, log = train_adapter(rows, train, out_dir=out, lm_head=model.get_output_embeddings(),
                                 norm_init=final_norm(model).weight.detach(), progress=progress)
    held = held_out_rows(rows, train.val_fraction, train.seed)
    report = evaluate_alignment(adapter, held, model.get_output_embeddings(), gamma=3)
    report["training"] = {key: log[key] for key in ("rows", "initial_val_loss", "best_val_loss", "epochs_run")}
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2)
    return adapter.to(dtype=model.dtype), report


def planned_tree(model, tokenizer, adapter, k: int, cache_dir: str, config: DemoConfig, progress: bool = True,
                 retrain: bool = False, use_shipped: bool = True):
    """The demo's tree: config.tree if it names one, else this machine's plan from the cache (per device, dtype
    and thread count), else the shipped plan of its machine class (device and dtype) for the shipped adapter, else
    planned now on the calibration prompts from this machine's measured costs and cached. retrain: plan now.
    Returns (TreeSpec, plan report)."""
    import sdalign_rt as sd
    from sdalign_rt.tree_planner import plan_tree

    if config.tree != "plan":
        return sd.TreeSpec.parse(config.tree), None
    device = model.get_input_embeddings().weight.device.type
    path = os.path.join(_adapter_dir(cache_dir, config, k), f"tree_plan-{device}-{config.dtype}-"
                        f"t{torch.get_num_threads()}-n{config.plan_max_nodes}-d{config.plan_max_depth}.json")
    shipped = os.path.join(SHIPPED, f"tree_plan-{device}-{config.dtype}.json")
    if (not use_shipped or shipped_adapter_dir(config) is None
            or (config.plan_max_nodes, config.plan_max_depth) != (8, 5)):
        shipped = ""
    for candidate in ([] if retrain else [path, shipped]):
        if candidate and os.path.isfile(candidate):
            with open(candidate) as f:
                report = json.load(f)
            report["source"] = "shipped" if candidate == shipped else "cache"
            return sd.TreeSpec.static(report["plan"]["choices"]), report
    prompts = [chat_ids(tokenizer, p) for p in demo_prompts.calibration_prompts()]
    planned, report = plan_tree(model, model, prompts, adapter=adapter, draft_layers=k,
                                max_nodes=config.plan_max_nodes, max_depth=config.plan_max_depth, ranks=3,
                                new_tokens=48, progress=progress)
    report["environment"] = environment()
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    return planned.tree, report


def _systems(model, adapter, k: int, tree, max_new_tokens: int) -> dict:
    """Each peer as a callable ids -> (sequences, stats or None)."""
    import sdalign_rt as sd

    speculative = sd.SpeculativeDecoder(model, model, adapter=adapter, tree=tree, draft_layers=k)
    plain = sd.SpeculativeDecoder(model, None)

    def hf(**extra):
        def run(ids):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, **extra)
            return out, None
        return run

    def ours(decoder):
        def run(ids):
            out = decoder.generate(ids, max_new_tokens, attention_mask=torch.ones_like(ids))
            return out.sequences, out.stats
        return run

    return {"hf_generate": hf(), "hf_prompt_lookup": hf(prompt_lookup_num_tokens=10),
            "hf_early_exit": hf(assistant_early_exit=k), "ours_one_token": ours(plain),
            "ours_speculative": ours(speculative)}


@torch.no_grad()
def measure(model, tokenizer, adapter, k: int, tree, config: DemoConfig, progress: bool = True) -> dict:
    """Every peer on the held-out prompts, one prompt at a time (batch 1), interleaved: each round runs every
    prompt through every system (the systems' order rotating from round to round). Speedups are over HF generate
    in the same round; the figure quoted is the median over rounds."""
    prompts = demo_prompts.eval_prompts()[: config.eval_prompts]
    ids_list = [chat_ids(tokenizer, p) for p in prompts]
    systems = _systems(model, adapter, k, tree, config.max_new_tokens)
    warm = chat_ids(tokenizer, "Hello!")  # first calls pay one-off allocation and dispatch costs
    for run in systems.values():
        run(warm)
    rounds = []
    stats_sum = {"steps": 0, "row_steps": 0, "accepted": 0, "draft_s": 0.0, "verify_forward_s": 0.0,
                 "bookkeeping_s": 0.0, "per_position": [0.0] * tree.depth}
    texts, identical = {}, {name: True for name in systems}
    bar = tqdm(total=config.rounds * len(prompts) * len(systems), desc=f"measure k={k}", unit="run",
               disable=not progress)
    for round_ in range(config.rounds):
        seconds = {name: 0.0 for name in systems}
        tokens = 0
        order = list(systems)[round_ % len(systems):] + list(systems)[: round_ % len(systems)]
        for index, ids in enumerate(ids_list):
            outputs = {}
            for name in order:
                start = time.perf_counter()
                sequences, stats = systems[name](ids)
                seconds[name] += time.perf_counter() - start
                outputs[name] = sequences
                if name == "ours_speculative" and round_ == 0:
                    _add_stats(stats_sum, stats)
                bar.update()
            expected = outputs["hf_generate"]
            tokens += int(expected.shape[1] - ids.shape[1])
            for name, sequences in outputs.items():
                identical[name] &= bool(sequences.shape == expected.shape and torch.equal(sequences, expected))
            if round_ == 0:
                texts[prompts[index]] = tokenizer.decode(outputs["ours_speculative"][0, ids.shape[1]:],
                                                         skip_special_tokens=True)
        rounds.append({"tokens": tokens, "seconds": seconds})
    bar.close()
    peers = {}
    for name in systems:
        per_round = [r["tokens"] / r["seconds"][name] for r in rounds]
        speedups = [r["seconds"]["hf_generate"] / r["seconds"][name] for r in rounds]
        peers[name] = {"tokens_per_s": statistics.median(per_round), "speedup": statistics.median(speedups),
                       "identical": identical[name], "tokens_per_s_by_round": per_round}
    rows = max(stats_sum["row_steps"], 1)
    depth = tree.depth
    hf_token_s = 1.0 / peers["hf_generate"]["tokens_per_s"]
    draft_step_s = stats_sum["draft_s"] / max(stats_sum["steps"], 1)
    return {
        "lossless": identical["ours_speculative"],
        "speedup": peers["ours_speculative"]["speedup"],
        "tokens_per_s_baseline": peers["hf_generate"]["tokens_per_s"],
        "tokens_per_s_spec": peers["ours_speculative"]["tokens_per_s"],
        "peers": peers,
        "acceptance_rate": stats_sum["accepted"] / (rows * depth),
        "token_acceptance": _token_acceptance(stats_sum["per_position"], rows),
        "mean_accepted": (stats_sum["accepted"] + rows) / rows,
        "per_position_acceptance": [c / rows for c in stats_sum["per_position"]],
        "draft_layers": k, "num_layers": num_decoder_layers(model), "tree": str(tree),
        "draft_ms_per_step": 1e3 * draft_step_s, "verifier_token_ms": 1e3 * hf_token_s,
        "draft_cost_ratio": draft_step_s / hf_token_s,  # a step's drafting / one HF generate token
        "step_split_ms": {key: 1e3 * stats_sum[key] / max(stats_sum["steps"], 1)
                          for key in ("draft_s", "verify_forward_s", "bookkeeping_s")},
        "bookkeeping_share_of_verify": stats_sum["bookkeeping_s"] / max(stats_sum["verify_forward_s"], 1e-12),
        "steps": stats_sum["steps"], "new_tokens": rounds[0]["tokens"], "rounds": config.rounds,
        "prompts": [{"prompt": p, "text": t} for p, t in texts.items()],
    }


def _add_stats(total: dict, stats: dict) -> None:
    for key in ("steps", "row_steps", "accepted"):
        total[key] += stats[key]
    for key in ("draft_s", "verify_forward_s", "bookkeeping_s"):
        total[key] += stats["timings"][key]
    total["per_position"] = [a + b * stats["row_steps"] for a, b in zip(total["per_position"],
                                                                        stats["per_position_acceptance"])]


def _token_acceptance(per_position_counts: list, row_steps: int) -> float:
    """Per-draft acceptance a of the chain model E[tokens] = (1 - a^(g+1)) / (1 - a): drafts accepted over
    drafts the verifier reached (a draft is reached when every draft before it was accepted)."""
    accepted = sum(per_position_counts)
    reached = row_steps + sum(per_position_counts[:-1])
    return accepted / max(reached, 1)


@torch.no_grad()
def feature_sweep(model, tokenizer, adapter, k: int, tree, config: DemoConfig, baseline_tokens_per_s: float,
                  progress: bool = True) -> list:
    """Feature mode (lossy) at each threshold on the held-out prompts: speedup over HF generate's median rate,
    tau, the share of emitted tokens that differ from greedy position by position, each prompt's first
    divergence."""
    import sdalign_rt as sd

    prompts = [chat_ids(tokenizer, p) for p in demo_prompts.eval_prompts()[: config.eval_prompts]]
    greedy = [model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=config.max_new_tokens,
                             do_sample=False) for ids in prompts]
    rows = []
    for threshold in tqdm(config.feature_thresholds, desc="feature sweep", unit="threshold", disable=not progress):
        decoder = sd.SpeculativeDecoder(model, model, adapter=adapter, tree=tree, draft_layers=k, mode="feature",
                                        feature_threshold=threshold)
        decoder.generate(prompts[0], 8)
        tokens = differ = compared = row_steps = accepted_tokens = 0
        seconds, divergences = 0.0, []
        for ids, expected in zip(prompts, greedy):
            start = time.perf_counter()
            out = decoder.generate(ids, config.max_new_tokens, attention_mask=torch.ones_like(ids))
            seconds += time.perf_counter() - start
            mine, theirs = out.sequences[0, ids.shape[1]:], expected[0, ids.shape[1]:]
            tokens += len(mine)
            width = min(len(mine), len(theirs))
            mismatch = (mine[:width] != theirs[:width]).nonzero()
            differ += int((mine[:width] != theirs[:width]).sum()) + abs(len(mine) - len(theirs))
            compared += max(len(mine), len(theirs))
            divergences.append(int(mismatch[0]) if len(mismatch) else (width if len(mine) != len(theirs) else None))
            row_steps += out.stats["row_steps"]
            accepted_tokens += out.stats["accepted"] + out.stats["row_steps"]
        rows.append({"threshold": threshold, "speedup": tokens / seconds / baseline_tokens_per_s,
                     "tokens_per_s": tokens / seconds, "mean_accepted": accepted_tokens / max(row_steps, 1),
                     "differing_token_share": differ / max(compared, 1), "first_divergence": divergences})
    return rows


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
             checkpoint: str | None = None, sweep_features: bool = True, retrain: bool = False) -> dict:
    """checkpoint: another causal LM directory (model + tokenizer with a chat template) in SmolLM2's place (the
    shipped adapter is SmolLM2's: another model trains its own). retrain: rebuild adapter and plan (see
    prepare_adapter)."""
    cache_dir = cache_dir or smollm2.default_cache_dir()
    model, tokenizer = load_model(checkpoint or smollm2.checkpoint(cache_dir), config.dtype)
    k = config.draft_layers
    ours = checkpoint is None  # the shipped adapter and plan are SmolLM2's
    adapter, alignment = prepare_adapter(model, tokenizer, k, cache_dir, config, progress, retrain, ours)
    tree, plan = planned_tree(model, tokenizer, adapter, k, cache_dir, config, progress, retrain, ours)
    result = measure(model, tokenizer, adapter, k, tree, config, progress)
    if sweep_features and config.feature_thresholds:
        result["feature_sweep"] = feature_sweep(model, tokenizer, adapter, k, tree, config,
                                                result["tokens_per_s_baseline"], progress)
    result["tree_plan"] = plan
    result["adapter_cosine"] = alignment["cosine"]["mean"]
    result["alignment"] = {key: alignment.get(key) for key in ("rows", "cosine", "top1_agreement", "top5_agreement",
                                                               "top1_agreement_draft_vocab", "draft_vocab_coverage",
                                                               "training")}
    result["config"] = asdict(config)
    result["environment"] = environment()
    return result


# Variants of the comparison (issue: which drafting setting accepts best): (label, changes to the config).
VARIANTS = (("k=2, 624 prompts", dict(draft_layers=2, train_prompts=624, context=False)),
            ("k=2, 624 prompts, context", dict(draft_layers=2, train_prompts=624, context=True)),
            ("k=2, 936 prompts, context", dict(draft_layers=2, train_prompts=936, context=True)),
            ("k=1, 936 prompts, context", dict(draft_layers=1, train_prompts=936, context=True)),
            ("k=3, 936 prompts, context", dict(draft_layers=3, train_prompts=936, context=True)),
            ("k=4, 936 prompts, context", dict(draft_layers=4, train_prompts=936, context=True)),
            ("k=2, 936 prompts, context, self-context 0.5",
             dict(draft_layers=2, train_prompts=936, context=True, self_context=0.5)))


def compare_adapters(config: DemoConfig, variants=VARIANTS, cache_dir: str | None = None, progress: bool = True,
                     checkpoint: str | None = None, tree: str = "chain:4") -> dict:
    """Each variant's adapter (trained unless cached): held-out top-1 agreement, and in the loop on the held-out
    prompts with one fixed tree (a chain, whose per-position rates are comparable across variants): per-draft
    acceptance, tau, and speedup over HF generate (interleaved per prompt, one round). The winner is the fastest."""
    import sdalign_rt as sd

    cache_dir = cache_dir or smollm2.default_cache_dir()
    model, tokenizer = load_model(checkpoint or smollm2.checkpoint(cache_dir), config.dtype)
    spec = sd.TreeSpec.parse(tree)
    prompts = [chat_ids(tokenizer, p) for p in demo_prompts.eval_prompts()[: config.eval_prompts]]
    rows = []
    for label, changes in variants:
        variant = replace(config, **changes)
        k = variant.draft_layers
        adapter, alignment = prepare_adapter(model, tokenizer, k, cache_dir, variant, progress)
        decoder = sd.SpeculativeDecoder(model, model, adapter=adapter, tree=spec, draft_layers=k)
        decoder.generate(prompts[0], 8)
        model.generate(prompts[0], max_new_tokens=8, do_sample=False)
        stats_sum = {"steps": 0, "row_steps": 0, "accepted": 0, "draft_s": 0.0, "verify_forward_s": 0.0,
                     "bookkeeping_s": 0.0, "per_position": [0.0] * spec.depth}
        ours_s = hf_s = 0.0
        lossless = True
        for ids in tqdm(prompts, desc=label, unit="prompt", disable=not progress):
            start = time.perf_counter()
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=config.max_new_tokens,
                                      do_sample=False)
            hf_s += time.perf_counter() - start
            start = time.perf_counter()
            out = decoder.generate(ids, config.max_new_tokens, attention_mask=torch.ones_like(ids))
            ours_s += time.perf_counter() - start
            lossless &= torch.equal(out.sequences, expected)
            _add_stats(stats_sum, out.stats)
        count = max(stats_sum["row_steps"], 1)
        rows.append({"variant": label, **changes, "lossless": lossless, "rows": alignment["rows"],
                     "top1_agreement": alignment.get("top1_agreement_draft_vocab", alignment["top1_agreement"]),
                     "adapter_cosine": alignment["cosine"]["mean"],
                     "per_position_acceptance": [c / count for c in stats_sum["per_position"]],
                     "token_acceptance": _token_acceptance(stats_sum["per_position"], count),
                     "mean_accepted": (stats_sum["accepted"] + count) / count,
                     "draft_ms_per_step": 1e3 * stats_sum["draft_s"] / max(stats_sum["steps"], 1),
                     "speedup": hf_s / ours_s})
    best = max(rows, key=lambda row: row["speedup"])
    return {"tree": tree, "winner": best["variant"], "rows": rows, "config": asdict(config),
            "environment": environment()}


def write_demo(result: dict, path: str) -> None:
    """JSON at path and a PNG beside it: the peers table, acceptance by draft position, feature mode's sweep."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    plt = pyplot(os.path.splitext(path)[0] + ".png")
    if plt is None:
        return
    sweep = result.get("feature_sweep") or []
    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(16 if sweep else 11, 4.2))
    table = axes[0]
    table.axis("off")
    cells = [[name, f"{p['tokens_per_s']:.1f}", f"{p['speedup']:.2f}x", "yes" if p["identical"] else "NO"]
             for name, p in result["peers"].items()]
    grid = table.table(cellText=cells, colLabels=["system", "tokens/s", "speedup", "identical"], loc="center")
    grid.scale(1, 1.6)
    table.set_title(f"median of {result['rounds']} interleaved rounds, {len(result['prompts'])} prompts x "
                    f"{result['config']['max_new_tokens']} tokens", fontsize=9)
    rates = result["per_position_acceptance"]
    axes[1].bar(range(1, len(rates) + 1), rates)
    axes[1].set_xlabel("draft depth")
    axes[1].set_ylabel("share of steps that accepted a draft there")
    axes[1].set_ylim(0, 1)
    axes[1].set_title(f"k={result['draft_layers']}, tree {result['tree']}: tau {result['mean_accepted']:.2f}",
                      fontsize=9)
    if sweep:
        thresholds = [row["threshold"] for row in sweep]
        axes[2].plot(thresholds, [row["speedup"] for row in sweep], "o-", label="speedup over HF generate")
        axes[2].plot(thresholds, [row["differing_token_share"] for row in sweep], "s-",
                     label="share of tokens that differ from greedy")
        axes[2].axhline(result["speedup"], color="grey", ls="--", lw=0.8, label="greedy (lossless) speedup")
        axes[2].set_xlabel("feature mode threshold (lossy)")
        axes[2].legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M drafting from its first {result['draft_layers']} layers "
                 f"({result['environment']['processor']}, {result['environment']['threads']} threads)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.splitext(path)[0] + ".png", dpi=110)
    plt.close(fig)


def write_comparison(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    plt = pyplot(os.path.splitext(path)[0] + ".png")
    if plt is None:
        return
    labels = [row["variant"] for row in result["rows"]]
    fig, ax = plt.subplots(figsize=(10, 4))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], [row["token_acceptance"] for row in result["rows"]], width=0.4,
           label="per-draft acceptance (in the loop)")
    ax.bar([i + 0.2 for i in x], [row["top1_agreement"] for row in result["rows"]], width=0.4,
           label="held-out top-1")
    ax.set_xticks(list(x), labels, rotation=15, fontsize=7)
    ax.set_ylim(0, 1)
    twin = ax.twinx()
    twin.plot(list(x), [row["speedup"] for row in result["rows"]], "ko-", label="speedup over HF generate")
    twin.set_ylabel("speedup")
    ax.legend(loc="upper left", fontsize=7)
    twin.legend(loc="upper right", fontsize=7)
    ax.set_title(f"adapter variants, tree {result['tree']}: winner {result['winner']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.splitext(path)[0] + ".png", dpi=110)
    plt.close(fig)
