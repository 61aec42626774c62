"""One decode step, before and after the lean runtime: calls, ops, syncs and host time per step, and speed.

    python3 bench/bench_step.py [--before REV] [--rounds 3] [--prompts 4] [--new-tokens 64] [--quick]

Two implementations of SpeculativeDecoder are measured on the same inputs: this checkout ("after") and the
repository at REV ("before", default 14030cf, the last commit before the lean step), checked out in a git
worktree and built there. Each runs in its own worker process; workers alternate (after, before, after, ...)
for --rounds rounds and ratios are medians over rounds, so machine noise hits both alike.

Configurations:
  embedded  the embedded default as it was before the lean step: SmolLM2-135M-Instruct (fp32) drafting from its
            own first 2 layers through the context-free adapter trained on 624 prompts (from the demo cache; an
            untrained one, labelled, if it is missing) with the 8-node tree of then, on held-out demo prompts
            (the same work for both implementations; today's default is measured by `sdalign-rt demo`);
  tiny      a random Llama verifier (hidden 256, 4 layers) with a perturbed copy as drafter, a static tree.

Per step (the generate callback marks step boundaries, so the prefill is left out): decoder passes (calls of
layer 0's input norm), transformers forward calls (calls of the decoder stack's forward), Python-level tensor
ops (torch function calls), host syncs (item / tolist / bool / int / nonzero / ... ), wall time, time inside
ModelRunner.forward (and, after, ModelRunner.logits: the verifier's head, which the
transformers forward runs inside its call before), and host time outside them. For the embedded default also, in the after worker: our own
one-token decode (SpeculativeDecoder(draft=None)) vs HF generate, interleaved per prompt.
Writes bench/results/step_cpu.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from embedded import load_embedded  # noqa: E402
from revisions import run_worker, worktree  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
DEFAULT_BEFORE = "14030cf"
# The embedded configuration (k = 2): the demo's adapter and tree as of the implementation before the lean step.
EMBEDDED_ADAPTER = "adapter-k2-float32-p624-n96-r256-v8192-e30-s0"
EMBEDDED_TREE = [(0,), (1,), (2,), (0, 0), (1, 0), (0, 1), (0, 0, 0), (0, 0, 0, 0)]
SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
           "unique", "masked_select", "__len__", "__iter__"}


class _Counter(TorchFunctionMode):
    """Counts torch function calls and the syncing ones among them."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = getattr(func, "__name__", "")
        if name in SYNCING or (name == "__getitem__" and _bool_index(args)):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


# ---- worker: runs inside the implementation under test -----------------------------------------------------

def _configs(name: str, quick: bool):
    """(target, draft, adapter, tree, draft_layers, prompts [list of [1, P] ids], note)."""
    import sdalign_rt as sd

    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        from sdalign_rt.models.tiny import finish_random_model

        def llama(seed):
            torch.manual_seed(seed)
            return finish_random_model(LlamaForCausalLM(LlamaConfig(
                vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=1024, attn_implementation="sdpa")))

        target, draft = llama(0), llama(0)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in draft.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.2 * p.std())
        prompts = [torch.randint(1, 4096, (1, 24), generator=torch.Generator().manual_seed(s)) for s in range(4)]
        tree = sd.TreeSpec.static([(0,), (1,), (0, 0), (0, 1), (0, 0, 0)])
        return target, draft, None, tree, None, prompts, "random weights"
    # The same work on both sides: an adapter both implementations load (no context input: the implementation
    # before the lean step has none) and the 8-node tree the demo used then. The demo's own tree and
    # context adapter are measured by `sdalign-rt demo`.
    model, _, adapter, prompts, note = load_embedded(EMBEDDED_ADAPTER, 2 if quick else 4)
    return model, model, adapter, sd.TreeSpec.static(EMBEDDED_TREE), 2, prompts, note


class _Probe:
    """Per-step deltas of counters, snapshotted by the generate callback (so the prefill is excluded)."""

    def __init__(self, models):
        from sdalign_rt import model_runner

        self.counter = None
        self.passes = 0
        self.hf_calls = 0
        self.forward_s = 0.0
        self.marks = []
        for model in models:  # the verifier, and the drafter where it is another model
            decoder = model.get_decoder()
            decoder.layers[0].input_layernorm.register_forward_pre_hook(lambda *a: self._count("passes"))
            decoder.register_forward_pre_hook(lambda *a: self._count("hf_calls"))
        # The forwards: ModelRunner.forward, and where it exists (after) ModelRunner.logits, the verifier's LM head,
        # which the transformers forward (before) runs inside its call.
        for name in ("forward", "logits"):
            original = getattr(model_runner.ModelRunner, name, None)
            if original is not None:
                setattr(model_runner.ModelRunner, name, self._timed(original))

    def _timed(self, original):
        def timed(runner, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(runner, *args, **kwargs)
            finally:
                self.forward_s += time.perf_counter() - start

        return timed

    def start(self, counter):
        self.counter, self.marks = counter, []

    def _count(self, name):
        setattr(self, name, getattr(self, name) + 1)

    def mark(self, _emitted=None):
        ops = self.counter.ops if self.counter else 0
        syncs = self.counter.syncs if self.counter else 0
        self.marks.append((time.perf_counter(), self.forward_s, self.passes, self.hf_calls, ops, syncs))

    def per_step(self) -> dict:
        deltas = [[b - a for a, b in zip(first, second)] for first, second in zip(self.marks, self.marks[1:])]
        keys = ("wall_ms", "forward_ms", "decoder_passes", "transformers_forward_calls", "tensor_ops", "host_syncs")
        columns = list(zip(*deltas))
        out = {key: statistics.mean(col) * (1e3 if key.endswith("_ms") else 1) for key, col in zip(keys, columns)}
        out["outside_forward_ms"] = out["wall_ms"] - out["forward_ms"]
        return out


def worker(config_name: str, new_tokens: int, counting: bool, quick: bool) -> dict:
    import sdalign_rt as sd

    torch.manual_seed(0)
    target, draft, adapter, tree, layers, prompts, note = _configs(config_name, quick)
    decoder = sd.SpeculativeDecoder(target, draft, adapter=adapter, tree=tree, draft_layers=layers)
    decoder.generate(prompts[0], 8)  # warm-up: allocation, plans, first-call dispatch
    probe = _Probe([target] if draft is target else [target, draft])
    result = {"note": note, "steps": 0, "tokens": 0, "spec_s": 0.0}
    per_prompt, accepted = [], []
    with torch.no_grad():
        for ids in prompts:
            counter = _Counter() if counting else None
            probe.start(counter)
            start = time.perf_counter()
            if counter is not None:
                with counter:
                    out = decoder.generate(ids, new_tokens, callback=probe.mark)
            else:
                out = decoder.generate(ids, new_tokens, callback=probe.mark)
            result["spec_s"] += time.perf_counter() - start
            result["tokens"] += out.sequences.shape[1] - ids.shape[1]
            result["steps"] += out.stats["steps"]
            accepted.append(out.stats["mean_accepted"])
            per_prompt.append(probe.per_step())
    result["per_step"] = {k: statistics.mean(p[k] for p in per_prompt) for k in per_prompt[0]}
    result["mean_accepted"] = statistics.mean(accepted)
    result["tokens_per_s"] = result["tokens"] / result["spec_s"]
    if config_name == "embedded" and not counting:
        result["one_token_vs_hf"] = _one_token_vs_hf(target, prompts, new_tokens)
    return result


def _one_token_vs_hf(model, prompts, new_tokens: int) -> dict:
    """Our one-token decode (the lean runtime, no drafts) against HF generate, interleaved per prompt."""
    import sdalign_rt as sd

    try:
        plain = sd.SpeculativeDecoder(model, None)
    except (TypeError, ValueError, AttributeError):
        return {"note": "this implementation has no draft=None decoding"}
    plain.generate(prompts[0], 4)
    ratios, ours_s, hf_s, identical = [], 0.0, 0.0, True
    for ids in prompts:
        start = time.perf_counter()
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
        hf = time.perf_counter() - start
        start = time.perf_counter()
        out = plain.generate(ids, new_tokens)
        ours = time.perf_counter() - start
        identical &= torch.equal(out.sequences, expected)
        ratios.append(hf / ours)
        ours_s, hf_s = ours_s + ours, hf_s + hf
    return {"speedup_median_over_prompts": statistics.median(ratios), "ours_s": ours_s, "hf_generate_s": hf_s,
            "identical": identical}


# ---- driver -------------------------------------------------------------------------------------------------

def _run_worker(root: str, config: str, new_tokens: int, counting: bool, quick: bool) -> dict:
    args = [config, "--new-tokens", str(new_tokens)] + (["--counting"] if counting else []) + (["--quick"] if quick else [])
    return run_worker(root, os.path.abspath(__file__), args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=DEFAULT_BEFORE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--configs", default="tiny,embedded")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--counting", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(RESULTS, "step_cpu.json"))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.new_tokens, args.counting, args.quick)))
        return 0
    from sdalign_rt.demo.experiment import environment

    roots = {"after": ROOT, "before": worktree(args.before)}
    result = {"before_rev": args.before, "after_rev": subprocess.run(["git", "-C", ROOT, "rev-parse", "--short",
                                                                      "HEAD"], capture_output=True,
                                                                     text=True).stdout.strip(),
              "new_tokens": args.new_tokens, "rounds": args.rounds, "environment": environment(), "configs": {}}
    for config in args.configs.split(","):
        entry = {"counts": {}, "rounds": {"after": [], "before": []}}
        for impl, root in roots.items():  # one instrumented pass each: counts, not times
            print(f"{config}: counting {impl} ...", flush=True)
            entry["counts"][impl] = _run_worker(root, config, args.new_tokens, True, args.quick)["per_step"]
        for round_ in range(args.rounds):
            for impl in ("after", "before") if round_ % 2 == 0 else ("before", "after"):
                print(f"{config}: round {round_ + 1} {impl} ...", flush=True)
                entry["rounds"][impl].append(_run_worker(roots[impl], config, args.new_tokens, False, args.quick))
        speed = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(entry["rounds"]["after"],
                                                                        entry["rounds"]["before"])]
        entry["speedup_after_over_before_median"] = statistics.median(speed)
        entry["note"] = entry["rounds"]["after"][0]["note"]
        result["configs"][config] = entry
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    _plot(result, os.path.splitext(args.out)[0] + ".png")
    print(json.dumps({c: {"counts": e["counts"], "speedup": e["speedup_after_over_before_median"]}
                      for c, e in result["configs"].items()}, indent=2))
    return 0


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("decoder_passes", "transformers_forward_calls", "tensor_ops", "host_syncs", "outside_forward_ms")
    configs = list(result["configs"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4))
    for ax, metric in zip(axes, metrics):
        for i, impl in enumerate(("before", "after")):
            values = [result["configs"][c]["counts"][impl].get(metric, 0) for c in configs]
            ax.bar([x + 0.38 * i for x in range(len(configs))], values, width=0.38, label=impl)
        ax.set_xticks([x + 0.19 for x in range(len(configs))], configs)
        ax.set_title(metric.replace("_", " ") + " / step", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle("per decode step, before vs after the lean runtime (CPU; counts from an instrumented pass)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
