"""Where a vLLM decode step's time goes, plain and with our drafter (cProfile over the in-process engine).

Why vLLM with our drafter runs at vLLM-plain speed on the CPU although its drafts land as often as in our runtime:
this splits the step into the target forward, the target's logits, the drafter (vLLM's `propose`: our draft
forward, its logits, the proposer's bookkeeping), and the rest (scheduling, sampling, rejection). One engine per
process (vLLM keeps process-wide state), the two run one after the other; absolute times are this machine's (and
cProfile's, which slows Python a little), the split is what to read. Per-step figures average over every engine
step, the conversations' prefill steps included. The embedded default only (SmolLM2, the shipped adapter, k = 2).

    .venv-vllm/bin/python bench/profile_vllm_step.py --json bench/results/vllm_step_profile_cpu.json
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import time

from sdalign_rt.vllm_plugin import engine

PARTS = {  # (file suffix, function name) -> part of the step
    ("v1/engine/llm_engine.py", "step"): "step",
    ("model_executor/models/llama.py", "forward"): "target_forward",
    ("model_executor/models/llama.py", "compute_logits"): "target_logits",
    ("v1/spec_decode/llm_base_proposer.py", "propose"): "drafter_propose",
    ("sdalign_rt/vllm_plugin/draft_model.py", "forward"): "draft_forward",
    ("sdalign_rt/vllm_plugin/draft_model.py", "compute_logits"): "draft_logits",
}


def profile(system: str, args) -> dict:
    import torch

    engine.configure(threads=torch.get_num_threads())
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from sdalign_rt.demo import experiment
    from sdalign_rt.vllm_plugin import register

    register()
    speculative = None if system == "plain" else {"method": "eagle", "model": args.draft_dir,
                                                   "num_speculative_tokens": 1}
    llm = LLM(model=args.checkpoint, dtype="float32", max_model_len=2048, seed=0, disable_log_stats=False,
              enable_prefix_caching=False, speculative_config=speculative)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    prompts = [TokensPrompt(prompt_token_ids=experiment.chat_ids(tokenizer, e["messages"])[0].tolist())
               for e in experiment.eval_conversations(args.prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens, detokenize=False)
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm
    profiler, tokens = cProfile.Profile(), 0
    start = time.perf_counter()
    profiler.enable()
    for prompt in prompts:  # one conversation at a time, as the bench decodes them
        tokens += len(llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids)
    profiler.disable()
    seconds = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats
    # Several functions of one file share a name (a model's forward calls its inner model's): the outermost has
    # the largest cumulative time and contains the others.
    found = {part: (0, 0.0) for part in PARTS.values()}
    for (file, _, name), (calls, _, _, cumulative, _) in stats.items():
        for (suffix, function), part in PARTS.items():
            if file.endswith(suffix) and name == function and cumulative > found[part][1]:
                found[part] = (calls, cumulative)
    steps = found["step"][0]
    per_step = {part: 1000 * cum / steps for part, (calls, cum) in found.items() if calls and part != "step"}
    per_step["step"] = 1000 * found["step"][1] / steps
    per_step["other"] = per_step["step"] - sum(per_step.get(p, 0.0) for p in
                                               ("target_forward", "target_logits", "drafter_propose"))
    return {"tokens": tokens, "steps": steps, "tokens_per_step": tokens / steps, "tokens_per_s": tokens / seconds,
            "ms_per_step": per_step}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", choices=("plain", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    from sdalign_rt.demo import experiment, smollm2
    from sdalign_rt.vllm_plugin.export import export_drafter

    args.checkpoint = smollm2.checkpoint()
    args.draft_dir = os.path.join(smollm2.default_cache_dir(), "vllm-drafter-k2")
    if args.system:
        channel = engine.private_stdout()
        channel.write(json.dumps(profile(args.system, args)) + "\n")
        channel.flush()
        return 0
    export_drafter(args.checkpoint, experiment.SHIPPED, 2, args.draft_dir)
    result = {"what": __doc__.split("\n")[0], "command": "python bench/profile_vllm_step.py " + " ".join(sys.argv[1:]),
              "conversations": args.prompts, "max_new_tokens": args.max_new_tokens, "systems": {}}
    for system in ("plain", "ours"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--system", system, "--prompts",
                              str(args.prompts), "--max-new-tokens", str(args.max_new_tokens)],
                             capture_output=True, text=True, check=True)
        result["systems"][system] = json.loads(out.stdout.strip().splitlines()[-1])
        entry = result["systems"][system]
        print(f"{system}: {entry['tokens_per_s']:.1f} tok/s, {entry['tokens_per_step']:.2f} tokens/step, ms/step "
              + ", ".join(f"{k} {v:.1f}" for k, v in entry["ms_per_step"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
