"""End-to-end decoding on CPU: tau / alpha and the per-step time split for three kinds of drafter.

    python bench/bench_decode.py [--quick] [--resume]

Verifier: a random Llama (hidden 512, 8 layers, vocab 8192, sharpened LM head so that greedy choices are
not near-ties). Drafters: (a) an unrelated random Llama (hidden 256, 2 layers), (b) the verifier itself
with an identity adapter, (c) the verifier with Gaussian noise (0.2 x each weight's std) on every weight.
Trees: chain:4, a static 8-node tree, dynamic:4,4,16; batch 1 and 4; greedy. Every run is checked against
target.generate(do_sample=False). Writes bench/results/decode_cpu.json and .png. Timings are per step:
drafting, the verifier forward, and bookkeeping (everything else: verification, KV compaction, emission).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
from tqdm import tqdm

import sdalign_rt as sd
from sdalign_rt.models.tiny import finish_random_model

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TREES = {"chain:4": sd.TreeSpec.chain(4),
         "static:8": sd.TreeSpec.static([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 0, 0)]),
         "dynamic:4,4,16": sd.TreeSpec.dynamic(4, 4, 16)}


def llama(seed: int, hidden: int, layers: int, vocab: int = 8192):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=1024, attn_implementation="sdpa")
    return finish_random_model(LlamaForCausalLM(config))


def drafters(target):
    unrelated = llama(1, 256, 2)
    perturbed = llama(0, 512, 8)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2 * p.std())
    return {"(a) unrelated": (unrelated, None), "(b) identical+identity adapter": (target, sd.BottleneckAdapter(512, 64)),
            "(c) perturbed": (perturbed, None)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 1 only, 32 new tokens")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out", default=os.path.join(RESULTS, "decode_cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    new_tokens = 32 if args.quick else 64
    batches = (1,) if args.quick else (1, 4)
    rows = []
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            rows = json.load(f)["rows"]
    done = {(r["drafter"], r["tree"], r["batch"]) for r in rows}
    target = llama(0, 512, 8)
    cases = drafters(target)
    baselines = {}
    todo = [(d, t, b) for d in cases for t in TREES for b in batches if (d, t, b) not in done]
    for drafter_name, tree_name, batch in tqdm(todo, desc="bench_decode", unit="run"):
        ids = torch.randint(1, 8192, (batch, 32), generator=torch.Generator().manual_seed(batch))
        if batch not in baselines:
            start = time.perf_counter()
            expected = target.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            baselines[batch] = (expected, time.perf_counter() - start)
        expected, baseline_s = baselines[batch]
        draft, adapter = cases[drafter_name]
        decoder = sd.SpeculativeDecoder(target=target, draft=draft, adapter=adapter, tree=TREES[tree_name])
        out = decoder.generate(ids, new_tokens)
        stats, timings = out.stats, out.stats["timings"]
        steps = max(stats["steps"], 1)
        rows.append({
            "drafter": drafter_name, "tree": tree_name, "batch": batch, "new_tokens": new_tokens,
            "lossless": bool(torch.equal(out.sequences, expected)),
            "tau": stats["mean_accepted"], "alpha": stats["acceptance_rate"],
            "per_position_acceptance": stats["per_position_acceptance"], "steps": stats["steps"],
            "draft_ms_per_step": 1e3 * timings["draft_s"] / steps,
            "verify_forward_ms_per_step": 1e3 * timings["verify_forward_s"] / steps,
            "bookkeeping_ms_per_step": 1e3 * timings["bookkeeping_s"] / steps,
            "bookkeeping_share_of_verify": stats["bookkeeping_share_of_verify"],
            "tokens_per_s_spec": batch * new_tokens / timings["total_s"],
            "tokens_per_s_baseline": batch * new_tokens / baseline_s,
            "speedup": baseline_s / timings["total_s"],
        })
        write(args.out, rows)
    write(args.out, rows)
    print(f"{'drafter':32s} {'tree':15s} {'B':>2s} {'lossless':>8s} {'tau':>5s} {'alpha':>6s} "
          f"{'draft':>7s} {'verify':>7s} {'bookkp':>7s} {'share':>6s} {'speedup':>7s}   (ms per step)")
    for r in rows:
        print(f"{r['drafter']:32s} {r['tree']:15s} {r['batch']:2d} {str(r['lossless']):>8s} {r['tau']:5.2f} "
              f"{r['alpha']:6.3f} {r['draft_ms_per_step']:7.2f} {r['verify_forward_ms_per_step']:7.2f} "
              f"{r['bookkeeping_ms_per_step']:7.2f} {r['bookkeeping_share_of_verify']:6.1%} {r['speedup']:7.2f}")
    return 0 if all(r["lossless"] for r in rows) else 1


def write(path: str, rows: list) -> None:
    import transformers

    meta = {"device": f"CPU ({platform.machine()}, {os.cpu_count()} threads)", "torch": torch.__version__,
            "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(["python"] + sys.argv),
            "note": "random-weight models: tau/alpha describe the drafter kinds, not a trained pair; CPU times "
                    "are machine-specific"}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    plot(rows, path.replace(".json", ".png"))


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [f"{r['drafter'][:3]} {r['tree']} B{r['batch']}" for r in rows]
    xs = range(len(rows))
    axes[0].bar(xs, [r["tau"] for r in rows])
    axes[0].set_ylabel("tau (tokens per verifier forward)")
    parts = [("draft_ms_per_step", "draft"), ("verify_forward_ms_per_step", "verifier forward"),
             ("bookkeeping_ms_per_step", "bookkeeping")]
    bottom = [0.0] * len(rows)
    for key, name in parts:
        values = [r[key] for r in rows]
        axes[1].bar(xs, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes[1].set_ylabel("ms per step (CPU)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=70, fontsize=7)
    fig.suptitle("sdalign_rt greedy speculative decoding on CPU, random Llama models (bench/bench_decode.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
