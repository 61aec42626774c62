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
# ours_adapter_only: the tree without the context lookup, measured when the demo's tree copies (lookup_top > 0).
PEERS = ("hf_generate", "hf_prompt_lookup", "hf_early_exit", "ours_one_token", "ours_prompt_lookup",
         "ours_adapter_only", "ours_speculative")


@dataclass
class DemoConfig:
    draft_layers: int = DEFAULT_DRAFT_LAYERS
    tree: str = "plan"  # "plan": planned from measured costs and cached; or a TreeSpec string ("chain:3", ...)
    dtype: str = "float32"  # float32: greedy outputs observed identical to the verifier's (bf16 may flip near-ties)
    max_new_tokens: int = 48  # per evaluation prompt (--full: 96)
    train_new_tokens: int = 96  # per training conversation
    generation_batch: int = 32
    bottleneck: int = 512  # R: 512 over 256 on held-out top-1 and in the loop (bench/results/adapters_cpu.json)
    draft_vocab: int = 8192
    context: bool = True  # the adapter also reads the verifier's previous state (EAGLE-style fusion)
    self_context: float = 0.0  # share of training rows that read the adapter's own prediction of that state
    # Train through the adapter's own predictions for this many positions (training-time test): 3 lifts the second
    # draft but, at the same budget, costs the first, which is all the planned tree drafts (adapters_cpu.json).
    unroll: int = 1
    kl_weight: float = 0.0  # soft targets: KL to the verifier's distribution over the draft vocabulary
    # "generated": the model's own training conversations (training_set.py, committed as train_set.json);
    # "templates": the earlier 16 templates x 78 topics
    train_set: str = "generated"
    train_prompts: int = 0  # how many training conversations to distil (0: all)
    sampled: float = 0.5  # share of them distilled a second time on text the verifier samples (labels stay greedy)
    sample_temperature: float = 0.8  # with top_p 0.95
    # Passes over ~285k rows (templates: 30, early stopping). 10 passes (early stopping at 7) fit held-out texts
    # of the generator better (top-1 0.424 against 0.410) but land fewer first drafts on the frozen set (0.25
    # against 0.32; adapters_cpu.json): more passes learn the generator's style.
    epochs: int = 3
    seed: int = 0
    # The tree's top path takes this many tokens from the context lookup where the text's last 2+ tokens occurred
    # before (TreeSpec.with_lookup_top): copies of the prompt at no extra verified width. 1.25x against 1.17x over
    # our one-token decode with the single planned draft (bench/results/lookup_cpu.json); 0: the adapter alone.
    lookup_top: int = 1
    eval_prompts: int = 4  # frozen evaluation conversations every peer runs, timed (--full: 11, one per kind)
    acceptance_prompts: int = 11  # frozen evaluation conversations the acceptance report decodes (--full: all 48)
    rounds: int = 2  # interleaved repetitions of every peer; speedups are medians over rounds (--full: 3)
    plan_max_nodes: int = 8
    plan_max_depth: int = 5
    feature_thresholds: tuple = (0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


# The published figures' measurement (sdalign-rt demo --full): more prompts, longer answers, more rounds.
FULL = dict(eval_prompts=11, acceptance_prompts=48, max_new_tokens=96, rounds=3)
TOP_P = 0.95
CALIBRATION = 8  # the generated set's last conversations: tree planning calibrates on them, training never sees them

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


def chat_ids(tokenizer, prompt) -> torch.Tensor:
    """[1, P] token ids of a conversation (one user turn as a string, or [{"role", "content"}, ...]) in the
    model's chat template, ready for the assistant's answer."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def _all_train_conversations(config: DemoConfig) -> list:
    if config.train_set == "generated":
        from sdalign_rt.demo.training_set import shipped_training_set

        return [c["messages"] for c in shipped_training_set()[:-CALIBRATION]]
    if config.train_set == "templates":
        return demo_prompts.train_prompts()
    raise ValueError(f'train_set must be "generated" or "templates", got {config.train_set!r}')


def _train_prompts(config: DemoConfig) -> list:
    """The training conversations (a user prompt string, or a list of messages), the first train_prompts of them."""
    prompts = _all_train_conversations(config)
    return prompts[: config.train_prompts] if config.train_prompts else prompts


def calibration_conversations(config: DemoConfig) -> list:
    """What tree planning calibrates acceptance on: apart from training and from the evaluation set."""
    if config.train_set == "generated":
        from sdalign_rt.demo.training_set import shipped_training_set

        return [c["messages"] for c in shipped_training_set()[-CALIBRATION:]]
    return demo_prompts.calibration_prompts()


def eval_conversations(count: int) -> list:
    """The first `count` conversations of the frozen evaluation set taken kind by kind in turn (every kind early)."""
    entries = demo_prompts.frozen_eval_set()
    kinds = list(dict.fromkeys(e["kind"] for e in entries))
    queues = {kind: [e for e in entries if e["kind"] == kind] for kind in kinds}
    ordered = []
    while any(queues.values()):
        for kind in kinds:
            if queues[kind]:
                ordered.append(queues[kind].pop(0))
    return ordered[:count]


def _layers(config: DemoConfig, k: int) -> list:
    """The drafter depths one distillation keeps: 1-3 (the k sweep) and k."""
    return sorted({1, 2, 3, k})


def _pairs_dir(cache_dir: str, config: DemoConfig, k: int, temperature: float = 0.0) -> str:
    """One distillation per training set, dtype, length and temperature (greedy, or sampled text), keeping every
    depth of _layers; more training conversations extend it (they are distilled in order)."""
    if config.train_set == "templates":  # the earlier layout: one depth per folder
        return os.path.join(cache_dir, f"distil-k{k}-{config.dtype}-n{config.train_new_tokens}")
    layers = "".join(str(d) for d in _layers(config, k))
    return os.path.join(cache_dir, f"distil-{config.train_set}-{config.dtype}-n{config.train_new_tokens}-L{layers}"
                                   + (f"-t{temperature:g}" if temperature else ""))


def _adapter_dir(cache_dir: str, config: DemoConfig, k: int) -> str:
    name = (f"adapter-k{k}-{config.dtype}-p{len(_train_prompts(config))}-n{config.train_new_tokens}-"
            f"r{config.bottleneck}-v{config.draft_vocab}-c{int(config.context)}-e{config.epochs}-s{config.seed}"
            + (f"-sc{config.self_context:g}" if config.self_context else ""))
    if config.train_set != "templates":
        name += f"-{config.train_set}-x{config.sampled:g}t{config.sample_temperature:g}-u{config.unroll}"
        name += f"-kl{config.kl_weight:g}" if config.kl_weight else ""
    return os.path.join(cache_dir, name)


def distilled_rows(model, tokenizer, k: int, cache_dir: str, config: DemoConfig, progress: bool = True) -> dict:
    """The training rows of the first train_prompts conversations (distilled now where missing): the verifier's
    greedy answers, then (generated set) its sampled answers to the first `sampled` share of them."""
    from sdalign_rt.extract import ExtractSample, extract_self_pairs, load_pairs

    prompts = _train_prompts(config)
    samples = [ExtractSample(id=str(i), input_ids=chat_ids(tokenizer, p)) for i, p in enumerate(prompts)]
    # Batches of similar lengths pad little; the order is fixed, so resuming and extending stay exact.
    samples.sort(key=lambda sample: sample.input_ids.shape[1])
    templates = config.train_set == "templates"
    passes = [(0.0, samples, len(prompts))]
    if config.sampled and not templates:
        chosen = int(round(config.sampled * len(prompts)))
        passes.append((config.sample_temperature, [s for s in samples if int(s.id) < chosen], chosen))
    parts = []
    for temperature, todo, count in passes:
        pairs = _pairs_dir(cache_dir, config, k, temperature)
        extract_self_pairs(model, todo, pairs, draft_layers=k if templates else _layers(config, k),
                           max_new_tokens=config.train_new_tokens, batch_size=config.generation_batch,
                           dtype=torch.float32 if templates else torch.float16, temperature=temperature,
                           top_p=TOP_P if temperature else None, seed=config.seed, progress=progress)
        rows = load_pairs(pairs, draft_layers=None if templates else k)
        # An extraction made for more conversations also serves fewer; samples numbered by their conversation.
        conversation = torch.tensor([int(i) for i in rows.pop("sample_ids")], dtype=torch.long)[rows["sample"]]
        keep = conversation < count
        rows = {key: (value[keep] if isinstance(value, torch.Tensor) else value) for key, value in rows.items()}
        rows["sample"] = conversation[keep] + (len(prompts) * len(parts))  # a sampled text is a sample of its own
        parts.append(rows)
    if len(parts) == 1:
        return parts[0]
    merged = {key: torch.cat([p[key] for p in parts]) for key, value in parts[0].items()
              if isinstance(value, torch.Tensor) and all(key in p for p in parts)}
    merged["meta"] = [p["meta"] for p in parts]
    return merged


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
        stale_rows = [_pairs_dir(cache_dir, config, k, t) for t in (0.0, config.sample_temperature)]
        for stale in [out] + stale_rows:
            shutil.rmtree(stale, ignore_errors=True)
    shipped = None if retrain or not use_shipped else shipped_adapter_dir(config)
    for folder in (out, shipped):
        report_path = os.path.join(folder, "alignment.json") if folder else ""
        if folder and os.path.isfile(os.path.join(folder, WEIGHTS_NAME)) and os.path.isfile(report_path):
            with open(report_path) as f:
                return BottleneckAdapter.from_pretrained(folder, dtype=model.dtype), json.load(f)
    report_path = os.path.join(out, "alignment.json")
    rows = distilled_rows(model, tokenizer, k, cache_dir, config, progress)
    generated = config.train_set != "templates"
    train = TrainConfig(bottleneck=config.bottleneck, epochs=config.epochs, ce_weight=1.0, input_norm=True,
                        draft_vocab=config.draft_vocab, context=config.context, self_context=config.self_context,
                        unroll=config.unroll if generated else 1, kl_weight=config.kl_weight,
                        split="samples" if generated else "rows",
                        batch_size=512 if generated else 256, lr=2e-3 if generated else 1e-3,
                        patience=2 if generated else 3, seed=config.seed)
    adapter, log = train_adapter(rows, train, out_dir=out, lm_head=model.get_output_embeddings(),
                                 norm_init=final_norm(model).weight.detach(), progress=progress)
    held = held_out_rows(rows, train.val_fraction, train.seed, train.split)
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
                        f"t{torch.get_num_threads()}-n{config.plan_max_nodes}-d{config.plan_max_depth}"
                        + (f"-l{config.lookup_top}" if config.lookup_top else "") + ".json")
    shipped = os.path.join(SHIPPED, f"tree_plan-{device}-{config.dtype}.json")
    shipped_lookup = (shipped_provenance() or {}).get("config", {}).get("lookup_top", 0)
    if (not use_shipped or shipped_adapter_dir(config) is None
            or (config.plan_max_nodes, config.plan_max_depth, config.lookup_top) != (8, 5, shipped_lookup)):
        shipped = ""
    for candidate in ([] if retrain else [path, shipped]):
        if candidate and os.path.isfile(candidate):
            with open(candidate) as f:
                report = json.load(f)
            report["source"] = "shipped" if candidate == shipped else "cache"
            return sd.TreeSpec.static(report["plan"]["choices"]), report
    prompts = [chat_ids(tokenizer, p) for p in calibration_conversations(config)]
    planned, report = plan_tree(model, model, prompts, adapter=adapter, draft_layers=k,
                                max_nodes=config.plan_max_nodes, max_depth=config.plan_max_depth, ranks=3,
                                new_tokens=48, lookup_top=config.lookup_top, progress=progress)
    report["environment"] = environment()
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    return planned.tree, report


# Prompt lookup alone through our runtime (no drafter model): 3 copied tokens per step, HF's peer.
OURS_LOOKUP_TREE = "lookup:3"


def _systems(model, adapter, k: int, tree, max_new_tokens: int) -> dict:
    """Each peer as a callable ids -> (sequences, stats or None)."""
    import sdalign_rt as sd

    speculative = sd.SpeculativeDecoder(model, model, adapter=adapter, tree=tree, draft_layers=k)
    plain = sd.SpeculativeDecoder(model, None)
    lookup_only = sd.SpeculativeDecoder(model, None, tree=sd.TreeSpec.parse(OURS_LOOKUP_TREE))

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

    systems = {"hf_generate": hf(), "hf_prompt_lookup": hf(prompt_lookup_num_tokens=10),
               "hf_early_exit": hf(assistant_early_exit=k), "ours_one_token": ours(plain),
               "ours_prompt_lookup": ours(lookup_only)}
    if tree.lookup_top:  # what the adapter's drafts alone give, beside the tree that also copies
        adapter_only = replace(tree, lookup_top=0)
        systems["ours_adapter_only"] = ours(sd.SpeculativeDecoder(model, model, adapter=adapter, tree=adapter_only,
                                                                  draft_layers=k))
    systems["ours_speculative"] = ours(speculative)
    return systems


@torch.no_grad()
def measure(model, tokenizer, adapter, k: int, tree, config: DemoConfig, progress: bool = True) -> dict:
    """Every peer on the held-out prompts, one prompt at a time (batch 1), interleaved: each round runs every
    prompt through every system (the systems' order rotating from round to round). Speedups are over HF generate
    in the same round; the figure quoted is the median over rounds."""
    prompts = [e["messages"] for e in eval_conversations(config.eval_prompts)]
    ids_list = [chat_ids(tokenizer, p) for p in prompts]
    systems = _systems(model, adapter, k, tree, config.max_new_tokens)
    warm = chat_ids(tokenizer, "Hello!")  # first calls pay one-off allocation and dispatch costs
    for run in systems.values():
        run(warm)
    rounds = []
    stats_sum = _new_stats(tree.depth)
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
                texts[prompts[index][-1]["content"]] = tokenizer.decode(outputs["ours_speculative"][0, ids.shape[1]:],
                                                                        skip_special_tokens=True)
        rounds.append({"tokens": tokens, "seconds": seconds})
    bar.close()
    peers = {}
    for name in systems:
        per_round = [r["tokens"] / r["seconds"][name] for r in rounds]
        speedups = [r["seconds"]["hf_generate"] / r["seconds"][name] for r in rounds]
        over_ours = [r["seconds"]["ours_one_token"] / r["seconds"][name] for r in rounds]
        peers[name] = {"tokens_per_s": statistics.median(per_round), "speedup": statistics.median(speedups),
                       "over_one_token": statistics.median(over_ours), "over_one_token_by_round": over_ours,
                       "identical": identical[name], "tokens_per_s_by_round": per_round}
    rows = max(stats_sum["row_steps"], 1)
    depth = tree.depth
    hf_token_s = 1.0 / peers["hf_generate"]["tokens_per_s"]
    draft_step_s = stats_sum["draft_s"] / max(stats_sum["steps"], 1)
    return {
        "lossless": identical["ours_speculative"],
        # the headline: what drafting adds over our own one-token decode (the same runtime without drafts)
        "speculation_over_one_token": peers["ours_speculative"]["over_one_token"],
        # the adapter's drafts alone (the same tree without the context lookup), when the tree copies too
        "adapter_only_over_one_token": peers.get("ours_adapter_only", peers["ours_speculative"])["over_one_token"],
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


@torch.no_grad()
def eval_acceptance(model, tokenizer, adapter, k: int, tree, count: int, max_new_tokens: int,
                    progress: bool = True) -> dict:
    """Acceptance in the loop on the first `count` frozen evaluation conversations (batch 1, greedy): with the
    demo's tree (tau, per depth, accepted drafts by depth and rank) and with a rank-0 chain of 4 (the first,
    second, ... draft's acceptance, comparable across trees and adapters); every output checked token for token
    against our one-token decode (itself checked against HF generate in `measure`)."""
    import sdalign_rt as sd

    entries = eval_conversations(count)
    plain = sd.SpeculativeDecoder(model, None)
    decoders = {"tree": sd.SpeculativeDecoder(model, model, adapter=adapter, tree=tree, draft_layers=k),
                "chain:4": sd.SpeculativeDecoder(model, model, adapter=adapter, tree=sd.TreeSpec.parse("chain:4"),
                                                 draft_layers=k)}
    report = {"conversations": len(entries), "max_new_tokens": max_new_tokens, "tree": str(tree)}
    totals = {name: dict(_new_stats(decoder.tree.depth), identical=True, by_kind={},
                         by_depth_rank=[{} for _ in range(decoder.tree.depth)]) for name, decoder in decoders.items()}
    for entry in tqdm(entries, desc="acceptance on the frozen set", unit="conversation", disable=not progress):
        ids = chat_ids(tokenizer, entry["messages"])
        expected = plain.generate(ids, max_new_tokens).sequences
        for name, decoder in decoders.items():
            out = decoder.generate(ids, max_new_tokens)
            stats, total = out.stats, totals[name]
            total["identical"] &= bool(torch.equal(out.sequences, expected))
            _add_stats(total, stats)
            for depth, by_rank in enumerate(stats["accepted_by_depth_rank"]):
                for rank, n in by_rank.items():
                    total["by_depth_rank"][depth][rank] = total["by_depth_rank"][depth].get(rank, 0) + n
            kind = total["by_kind"].setdefault(entry["kind"], [0, 0])
            kind[0] += stats["accepted"] + stats["row_steps"]
            kind[1] += stats["row_steps"]
    for name, total in totals.items():
        steps = max(total["row_steps"], 1)
        report[name] = {
            "identical": total["identical"], "steps": total["row_steps"],
            "mean_accepted": (total["accepted"] + steps) / steps,  # tau: tokens per verifier step
            "per_position_acceptance": [round(c / steps, 4) for c in total["per_position"]],
            "accepted_by_depth_rank": [{r: round(n / steps, 4) for r, n in sorted(d.items())}
                                       for d in total["by_depth_rank"]],
            "mean_accepted_by_kind": {kind: round(a / max(n, 1), 3)
                                      for kind, (a, n) in sorted(total["by_kind"].items())},
        }
    chain = report["chain:4"]["per_position_acceptance"]
    report["first_draft"], report["second_draft"] = chain[0], chain[1]
    report["lossless"] = all(report[name]["identical"] for name in decoders)
    return report


def _new_stats(depth: int) -> dict:
    """What _add_stats sums over decodes with a tree of this depth."""
    return {"steps": 0, "row_steps": 0, "accepted": 0, "draft_s": 0.0, "verify_forward_s": 0.0, "bookkeeping_s": 0.0,
            "per_position": [0.0] * depth}


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

    prompts = [chat_ids(tokenizer, e["messages"]) for e in eval_conversations(config.eval_prompts)]
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
    tree = tree.with_lookup_top_within(config.lookup_top)  # as deep as the planned tree's top path reaches
    result = measure(model, tokenizer, adapter, k, tree, config, progress)
    if config.acceptance_prompts:
        result["acceptance"] = eval_acceptance(model, tokenizer, adapter, k, tree, config.acceptance_prompts,
                                               config.max_new_tokens, progress)
    if sweep_features and config.feature_thresholds:
        # Feature mode accepts by the drafter's states: the tree without the context lookup.
        result["feature_sweep"] = feature_sweep(model, tokenizer, adapter, k, replace(tree, lookup_top=0), config,
                                                result["tokens_per_s_baseline"], progress)
    result["tree_plan"] = plan
    result["adapter_cosine"] = alignment["cosine"]["mean"]
    result["alignment"] = {key: alignment.get(key) for key in ("rows", "cosine", "top1_agreement", "top5_agreement",
                                                               "top1_agreement_draft_vocab", "draft_vocab_coverage",
                                                               "training")}
    result["config"] = asdict(config)
    result["environment"] = environment()
    return result


# Variants of the comparison (issue: which data, depth k, rank R and training accept best): (label, changes).
SWEEP = dict(epochs=3, bottleneck=256, unroll=1)  # the same training budget for every variant
VARIANTS = (("templates, k=2, R=256 (shipped before)", dict(train_set="templates", train_prompts=936, unroll=1,
                                                           epochs=30, sampled=0.0, bottleneck=256)),
            ("generated, k=2, R=256", dict(SWEEP)),
            ("generated, k=2, R=256, unroll 3", dict(SWEEP, unroll=3)),
            ("generated, k=2, R=512", dict(SWEEP, bottleneck=512)),
            ("generated, k=2, R=512, soft targets (KL)", dict(SWEEP, bottleneck=512, kl_weight=1.0)),
            ("generated, k=1, R=256", dict(SWEEP, draft_layers=1)),
            ("generated, k=3, R=256", dict(SWEEP, draft_layers=3)),
            ("generated, half the texts, k=2, R=256", dict(SWEEP, train_prompts=1135)),
            ("generated, k=2, R=512, 10 passes", dict(SWEEP, bottleneck=512, epochs=10)))


def compare_adapters(config: DemoConfig, variants=VARIANTS, cache_dir: str | None = None, progress: bool = True,
                     checkpoint: str | None = None, tree: str = "chain:4") -> dict:
    """Each variant's adapter (trained unless cached) on the frozen evaluation set (config.acceptance_prompts
    conversations, config.max_new_tokens each) with one fixed tree (a chain, whose per-position rates compare
    across variants): acceptance by draft position, tau, and the speed over our own one-token decode (timed
    interleaved per conversation; the ratio that isolates drafting); plus the held-out top-1 of training. The
    winner is the fastest."""
    import sdalign_rt as sd

    cache_dir = cache_dir or smollm2.default_cache_dir()
    model, tokenizer = load_model(checkpoint or smollm2.checkpoint(cache_dir), config.dtype)
    spec = sd.TreeSpec.parse(tree)
    prompts = [chat_ids(tokenizer, e["messages"]) for e in eval_conversations(config.acceptance_prompts)]
    plain = sd.SpeculativeDecoder(model, None)
    rows = []
    for label, changes in variants:
        variant = replace(config, **changes)
        k = variant.draft_layers
        adapter, alignment = prepare_adapter(model, tokenizer, k, cache_dir, variant, progress,
                                             use_shipped=checkpoint is None)
        decoder = sd.SpeculativeDecoder(model, model, adapter=adapter, tree=spec, draft_layers=k)
        decoder.generate(prompts[0], 8)
        plain.generate(prompts[0], 8)
        stats_sum = _new_stats(spec.depth)
        seconds = {"plain": 0.0, "ours": 0.0}
        lossless = True
        for index, ids in enumerate(tqdm(prompts, desc=label, unit="conversation", disable=not progress)):
            runs = [("plain", plain), ("ours", decoder)]
            outputs = {}
            for name, runner in (runs if index % 2 == 0 else runs[::-1]):
                start = time.perf_counter()
                outputs[name] = runner.generate(ids, config.max_new_tokens)
                seconds[name] += time.perf_counter() - start
            lossless &= torch.equal(outputs["ours"].sequences, outputs["plain"].sequences)
            _add_stats(stats_sum, outputs["ours"].stats)
        count = max(stats_sum["row_steps"], 1)
        rows.append({"variant": label, **changes, "lossless": lossless, "rows": alignment["rows"],
                     "training_rows": alignment.get("training", {}).get("rows"),
                     "top1_agreement": alignment.get("top1_agreement_draft_vocab", alignment["top1_agreement"]),
                     "adapter_cosine": alignment["cosine"]["mean"],
                     "per_position_acceptance": [c / count for c in stats_sum["per_position"]],
                     "token_acceptance": _token_acceptance(stats_sum["per_position"], count),
                     "mean_accepted": (stats_sum["accepted"] + count) / count,
                     "draft_ms_per_step": 1e3 * stats_sum["draft_s"] / max(stats_sum["steps"], 1),
                     "over_one_token": seconds["plain"] / seconds["ours"]})
    best = max(rows, key=lambda row: row["over_one_token"])
    return {"tree": tree, "conversations": len(prompts), "max_new_tokens": config.max_new_tokens,
            "winner": best["variant"], "rows": rows, "config": asdict(config), "environment": environment()}


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
    ax.bar([i - 0.2 for i in x], [row["per_position_acceptance"][0] for row in result["rows"]], width=0.4,
           label="first draft accepted (in the loop, frozen set)")
    ax.bar([i + 0.2 for i in x], [row["top1_agreement"] for row in result["rows"]], width=0.4,
           label="held-out top-1")
    ax.set_xticks(list(x), labels, rotation=15, fontsize=7)
    ax.set_ylim(0, 1)
    twin = ax.twinx()
    twin.plot(list(x), [row["over_one_token"] for row in result["rows"]], "ko-",
              label="speed over our one-token decode")
    twin.set_ylabel("speedup over one-token decode")
    ax.legend(loc="upper left", fontsize=7)
    twin.legend(loc="upper right", fontsize=7)
    ax.set_title(f"adapter variants, tree {result['tree']}: winner {result['winner']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.splitext(path)[0] + ".png", dpi=110)
    plt.close(fig)
