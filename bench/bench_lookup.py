"""Context lookup on the embedded default: copied drafts beside or in place of the adapter's, in one run.

    python bench/bench_lookup.py [--rounds 3] [--prompts 11] [--new 64]

SmolLM2-135M-Instruct drafting from its own first 2 layers with the shipped adapter, on the frozen evaluation
set's first conversations (one per kind), greedy, fp32, the machine's threads. Systems, interleaved per
conversation and repeated: our one-token decode (the ratio's base); prompt lookup alone (`lookup:M`, no drafter
model); the shipped single draft (`static:[[0]]`, what the planner picks on a 2-core CPU); that draft with a
lookup chain beside it (`+lookup:M`, extra verified nodes); and with the lookup in its place where the text's last
2+ tokens occurred before (`+lookup-top:1`, no extra width). Every output is checked against the one-token decode
(greedy: token-identical). Writes bench/results/lookup_cpu.json (+ .png): per system tokens/s, the median over
rounds of its speed over the one-token decode, tau, and the per-step split (draft / verify / bookkeeping ms).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SYSTEMS = ("one-token", "lookup:3", "static:[[0]]", "static:[[0]]+lookup:2", "static:[[0]]+lookup-top:1")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=11)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--json", default=os.path.join(RESULTS, "lookup_cpu.json"))
    args = parser.parse_args(argv)

    from sdalign_rt.adapter import BottleneckAdapter
    from sdalign_rt.decoder import SpeculativeDecoder
    from sdalign_rt.demo import experiment
    from sdalign_rt.demo.smollm2 import checkpoint
    from sdalign_rt.trees import TreeSpec

    model, tokenizer = experiment.load_model(checkpoint(), "float32")
    adapter = BottleneckAdapter.from_pretrained(experiment.SHIPPED)
    k = experiment.shipped_provenance()["config"]["draft_layers"]

    def decoder(name):
        if name == "one-token":
            return SpeculativeDecoder(model, None)
        if name.startswith("lookup:"):
            return SpeculativeDecoder(model, None, tree=TreeSpec.parse(name))
        return SpeculativeDecoder(model, model, adapter=adapter, draft_layers=k, tree=TreeSpec.parse(name))

    decoders = {name: decoder(name) for name in SYSTEMS}
    prompts = [experiment.chat_ids(tokenizer, e["messages"]) for e in experiment.eval_conversations(args.prompts)]
    for d in decoders.values():  # warm-up: first-call setup stays out of the timings
        d.generate(prompts[0], 4)
    per_round = []
    totals = {name: {"tokens": 0, "seconds": 0.0, "steps": 0, "tau": [], "draft_s": 0.0, "verify_forward_s": 0.0,
                     "bookkeeping_s": 0.0, "identical": True} for name in SYSTEMS}
    bar = tqdm(total=args.rounds * len(prompts) * len(SYSTEMS), desc="lookup bench", unit="decode")
    for r in range(args.rounds):
        this = {name: [0, 0.0] for name in SYSTEMS}
        for i, ids in enumerate(prompts):
            order = SYSTEMS[(i + r) % len(SYSTEMS):] + SYSTEMS[:(i + r) % len(SYSTEMS)]  # rotate who runs first
            outputs = {}
            for name in order:
                start = time.perf_counter()
                out = decoders[name].generate(ids, args.new)
                seconds = time.perf_counter() - start
                outputs[name] = out.sequences
                new = out.sequences.shape[1] - ids.shape[1]
                this[name][0] += new
                this[name][1] += seconds
                t = totals[name]
                t["tokens"] += new
                t["seconds"] += seconds
                t["steps"] += out.stats["steps"]
                t["tau"].append(out.stats["mean_accepted"])
                for key in ("draft_s", "verify_forward_s", "bookkeeping_s"):
                    t[key] += out.stats["timings"][key]
                bar.update()
            for name in SYSTEMS:
                totals[name]["identical"] &= torch.equal(outputs[name], outputs["one-token"])
        per_round.append({name: this[name][0] / this[name][1] for name in SYSTEMS})
    bar.close()
    systems = {}
    for name in SYSTEMS:
        t = totals[name]
        ratios = [round_[name] / round_["one-token"] for round_ in per_round]
        systems[name] = {
            "tokens_per_s": t["tokens"] / t["seconds"],
            "over_one_token": statistics.median(ratios), "over_one_token_by_round": ratios,
            "mean_accepted": statistics.mean(t["tau"]),
            "ms_per_step": {key[:-2]: 1e3 * t[key] / t["steps"] for key in ("draft_s", "verify_forward_s",
                                                                            "bookkeeping_s")},
            "identical": t["identical"],
        }
    result = {"what": __doc__.splitlines()[0], "command": "python bench/bench_lookup.py " + " ".join(argv or sys.argv[1:]),
              "prompts": len(prompts), "max_new_tokens": args.new, "rounds": args.rounds, "systems": systems,
              "environment": experiment.environment()}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    _plot(result, os.path.splitext(args.json)[0] + ".png")
    for name, s in systems.items():
        print(f"{name:28s} {s['tokens_per_s']:6.1f} tok/s  x{s['over_one_token']:.2f} over one-token  "
              f"tau {s['mean_accepted']:.2f}  identical {s['identical']}")
    return result


def _plot(result: dict, path: str) -> None:
    from sdalign_rt.plotting import pyplot

    plt = pyplot(path)
    if plt is None:
        return
    names = list(result["systems"])
    fig, ax = plt.subplots(figsize=(9, 3.8))
    values = [result["systems"][n]["over_one_token"] for n in names]
    ax.barh(names, values, color=["grey"] + ["C0"] * (len(names) - 1))
    for y, (n, v) in enumerate(zip(names, values)):
        ax.text(v, y, f" x{v:.2f}, tau {result['systems'][n]['mean_accepted']:.2f}", va="center", fontsize=8)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("speed over our one-token decode (median of interleaved rounds)")
    ax.set_title(f"context lookup, SmolLM2-135M, {result['prompts']} frozen conversations x {result['max_new_tokens']}"
                 " tokens, 2-core CPU fp32", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
