"""The step object on the CPU: this checkout against an earlier revision, and layer reuse on and off.

    python3 bench/bench_step_object.py [--before REV] [--rounds 3] [--prompts 4] [--new-tokens 64]

The embedded model (SmolLM2-135M-Instruct, fp32, grouped-query heads) drafting from its own first 2 layers through
a BottleneckAdapter with the 8-node static tree of bench_step.py, on held-out demo prompts. Both implementations do
the same work: the demo's trained context-free adapter when the demo cache holds it, else an untrained one
(labelled: acceptance is then meaningless, the cost of a step is not). Each round runs one worker process per
implementation (this checkout "after", the git worktree of REV "before"), alternating their order; ratios are
medians over rounds. Per worker, interleaved per prompt:

  speculative   SpeculativeDecoder(model, model, adapter, tree, draft_layers=2): tokens/s
  one_token     SpeculativeDecoder(model, None): tokens/s (our own one-token decode)
and in the "after" worker also
  speculative_no_reuse   the same decoder with reuse_layers=False: tokens/s
  verify_forward_ms      one verify forward of the tree on a prepared draft, with and without layer reuse
                         (median of repeats, interleaved)
Outputs are compared token for token across implementations and modes. Writes bench/results/step_object_cpu.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from embedded import load_embedded  # noqa: E402
from revisions import ROOT, head, run_worker, worktree  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DEFAULT_BEFORE = "8682ba2"  # the last commit before the step object
ADAPTER = "adapter-k2-float32-p624-n96-r256-v8192-e30-s0"
TREE = [(0,), (1,), (2,), (0, 0), (1, 0), (0, 1), (0, 0, 0), (0, 0, 0, 0)]


def _setup(prompt_count: int):
    import sdalign_rt as sd

    model, _, adapter, prompts, note = load_embedded(ADAPTER, prompt_count, seed_untrained=True)
    return sd, model, adapter, sd.TreeSpec.static(TREE), prompts, note


def _verify_forward_ms(sd, decoder, ids, repeats: int = 9) -> dict:
    """One verify forward of a drafted tree, layer reuse on and off, interleaved: medians (ms)."""
    times = {"reuse": [], "no_reuse": []}
    with sd.ops.value_checks(False), decoder.session(1, ids.shape[1] + 64) as step:
        step.prefill(ids, torch.ones_like(ids))
        draft = step.draft()
        for _ in range(repeats):
            for name, reuse in (("reuse", True), ("no_reuse", False)):
                step.reuse_layers = reuse
                start = time.perf_counter()
                step.verify_forward(draft)
                times[name].append(1e3 * (time.perf_counter() - start))
        step.reuse_layers = decoder.reuse_layers
    return {name: statistics.median(values) for name, values in times.items()}


def worker(prompt_count: int, new_tokens: int) -> dict:
    sd, model, adapter, tree, prompts, note = _setup(prompt_count)
    decoders = {"speculative": sd.SpeculativeDecoder(model, model, adapter=adapter, tree=tree, draft_layers=2),
                "one_token": sd.SpeculativeDecoder(model, None)}
    after = "reuse_layers" in sd.SpeculativeDecoder.__init__.__code__.co_varnames
    if after:
        decoders["speculative_no_reuse"] = sd.SpeculativeDecoder(model, model, adapter=adapter, tree=tree,
                                                                 draft_layers=2, reuse_layers=False)
    for decoder in decoders.values():
        decoder.generate(prompts[0], 8)  # warm-up: allocation, plans
    seconds = {name: 0.0 for name in decoders}
    tokens = {name: 0 for name in decoders}
    digest = {name: hashlib.sha256() for name in decoders}
    tau = []
    with torch.no_grad():
        for ids in prompts:
            for name, decoder in decoders.items():
                start = time.perf_counter()
                out = decoder.generate(ids, new_tokens)
                seconds[name] += time.perf_counter() - start
                tokens[name] += out.sequences.shape[1] - ids.shape[1]
                digest[name].update(out.sequences.numpy().tobytes())
                if name == "speculative":
                    tau.append(out.stats["mean_accepted"])
    result = {"note": note, "tau": statistics.mean(tau),
              "tokens_per_s": {name: tokens[name] / seconds[name] for name in decoders},
              "digest": {name: d.hexdigest()[:16] for name, d in digest.items()}}
    if after:
        result["verify_forward_ms"] = _verify_forward_ms(sd, decoders["speculative"], prompts[0])
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=DEFAULT_BEFORE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(RESULTS, "step_object_cpu.json"))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.prompts, args.new_tokens)))
        return 0
    from sdalign_rt.demo.experiment import environment

    roots = {"after": ROOT, "before": worktree(args.before)}
    result = {"before_rev": args.before, "after_rev": head(), "new_tokens": args.new_tokens,
              "prompts": args.prompts, "rounds": args.rounds, "environment": environment(),
              "command": "python3 bench/bench_step_object.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "by_round": {"after": [], "before": []}}
    for round_ in range(args.rounds):
        for impl in ("after", "before") if round_ % 2 == 0 else ("before", "after"):
            print(f"round {round_ + 1}: {impl} ...", flush=True)
            worker_args = ["--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens)]
            result["by_round"][impl].append(run_worker(roots[impl], os.path.abspath(__file__), worker_args))
    after, before = result["by_round"]["after"], result["by_round"]["before"]

    def median_ratio(name_a, rows_a, name_b, rows_b):
        return statistics.median(a["tokens_per_s"][name_a] / b["tokens_per_s"][name_b] for a, b in zip(rows_a, rows_b))

    result["ratios"] = {
        "speculative_after_over_before": median_ratio("speculative", after, "speculative", before),
        "one_token_after_over_before": median_ratio("one_token", after, "one_token", before),
        "speculative_reuse_over_no_reuse": median_ratio("speculative", after, "speculative_no_reuse", after),
        "verify_forward_reuse_over_no_reuse_time": statistics.median(
            r["verify_forward_ms"]["reuse"] / r["verify_forward_ms"]["no_reuse"] for r in after),
        "speculative_over_one_token_after": median_ratio("speculative", after, "one_token", after),
    }
    digests = [r["digest"] for r in after + before]
    result["identical"] = all(len({d[name] for d in digests if name in d}) == 1 for name in digests[0]) and len(
        {d["speculative"] for d in digests} | {d["one_token"] for d in digests}) == 1
    result["note"] = after[0]["note"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result["ratios"], indent=2), "identical:", result["identical"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
