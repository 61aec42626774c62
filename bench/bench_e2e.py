"""Step cost at the real 7B dims: what a draft, a verify and the bookkeeping cost, and what that projects.

    python3 bench/bench_e2e.py [--device cuda] [--context N] [--prefill-layers N] [--sweep PATH] [--quick]

Models: the exact Vicuna-7B architecture (LlamaConfig: hidden 4096, MLP 11008, 32 layers, 32 heads, vocab 32000),
bf16, random weights (timing does not depend on weight values), one model serving as verifier and, through
`draft_layers=k` views of its first k layers, as drafter (EventGPT's LLM is the same architecture); the
vision towers at their real sizes (CLIP ViT-L/14 at 224 px: EventGPT's event images, Video-LLaVA's 8 frames).

Measured (median, p10 / p90):
  draft_cost      one drafted token with the first k layers, k in 1, 2, 4, 8, 16, 32, plus the adapter and the
                  verifier's LM head it drafts through;
  verify_cost     one verifier forward over T tree nodes (T in 1 .. 128) on top of the context;
  prefill         the drafter's k-layer prefill of 582 event tokens vs the verifier's prefill of 8 x 257 video
                  tokens (+ text). With --prefill-layers N (the CPU default) both are timed at 1 and N layers and
                  scaled linearly to k / 32 layers (each layer costs the same; labelled "scaled");
  vision          the towers on their inputs;
  decode_step     SpeculativeDecoder(draft_layers=k, chain) on the 7B model: per step draft / verify forward /
                  bookkeeping, and bookkeeping as a share of a verifier forward (target <= 3%).
Projected (labelled as such): speedup for alpha in 0.3 / 0.5 / 0.7, and for the per-draft acceptance per k
measured on the embedded default (--sweep, from `sdalign-rt compare-adapters`), from the measured costs:
  speedup(k, gamma) = E[tokens](a, gamma) * verify(1) / (verify(gamma + 1) + gamma * draft(k) + bookkeeping).
With --compile, the decode step again with compiled forwards (CUDA graphs on a GPU), wall and GPU time per step.
Writes bench/results/e2e_<device>.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import sdalign_rt as sd
from sdalign_rt.demo.experiment import cpu_name
from sdalign_rt.eval_alignment import expected_tokens
from sdalign_rt.model_runner import ModelRunner, new_cache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import time_cpu, time_cuda  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
EVENT_TOKENS = 582  # EventGPT's event features in the prompt
VIDEO_TOKENS = 8 * 257  # Video-LLaVA: 8 frames x (256 patches + CLS) of ViT-L/14 at 224 px
TEXT_TOKENS = 48
DEPTHS = (1, 2, 4, 8, 16, 32)
TREE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def vicuna_7b(smoke: bool = False):
    """The Vicuna-7B LlamaConfig; smoke: the same 32 layers and vocab at toy width (tests of this script)."""
    from transformers import LlamaConfig

    width = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2) if smoke else \
        dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    return LlamaConfig(vocab_size=32000, num_hidden_layers=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       attn_implementation="sdpa", **width)


def random_model(config, device, dtype=torch.bfloat16):
    """Build on the meta device, then fill every tensor in place: no fp32 copy, no slow init."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # its buffers were left empty
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def ms(stats: dict) -> dict:
    return {k.replace("_us", "_ms"): v / 1e3 for k, v in stats.items() if k.endswith("_us")} | {"reps": stats["reps"]}


def timed(fn, device, quick: bool) -> dict:
    if device.type == "cuda":
        return ms(time_cuda(fn, reps=10 if quick else 30, warmup=3))
    return ms(time_cpu(fn, min_reps=2 if quick else 3, min_seconds=0.0, warmup=1))


def _runner_with_context(model, context: int, device, layers: int | None = None) -> ModelRunner:
    """The runtime's runner (lean forward, static cache) over `layers` of the model, `context` tokens cached."""
    runner = ModelRunner(model, new_cache(model, 1, context + 160, layers), num_layers=layers)
    ids = torch.randint(1, 32000, (1, context), device=device)
    runner.prefill(ids, torch.ones_like(ids))
    return runner


def _tree_forward(runner: ModelRunner, tokens: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """One forward of a chain of tokens [1, T] in the tree region; lengths stay, so repeats overwrite it."""
    cache = runner.cache
    offsets = torch.arange(tokens.shape[1], device=tokens.device)[None]
    return runner.forward(runner.embed(tokens), cache.next_positions()[:, None] + offsets,
                          cache.lengths[:, None] + offsets, cache.attention_bias(block, cache.lengths))


def _chain_block(nodes: int, device, dtype) -> torch.Tensor:
    from sdalign_rt.kv_cache import additive

    return additive(torch.ones(1, nodes, nodes, dtype=torch.bool, device=device).tril(), dtype)


@torch.no_grad()
def draft_costs(model, adapter, context: int, device, quick: bool) -> dict:
    """One drafted token through the first k layers (k-layer cache of `context` tokens) + adapter + LM head."""
    head = model.get_output_embeddings()
    rows = {}
    for k in DEPTHS:
        runner = _runner_with_context(model, context, device, layers=k)
        token = torch.randint(1, 32000, (1, 1), device=device)
        block = _chain_block(1, device, runner.cache.dtype)

        def step():
            return head(adapter(_tree_forward(runner, token, block))).argmax(-1)

        rows[str(k)] = timed(step, device, quick)
        del runner
    return rows


@torch.no_grad()
def verify_costs(model, context: int, device, quick: bool) -> dict:
    runner = _runner_with_context(model, context, device)
    rows = {}
    for nodes in TREE_SIZES:
        tokens = torch.randint(1, 32000, (1, nodes), device=device)
        block = _chain_block(nodes, device, runner.cache.dtype)  # a chain: the costliest mask

        def step():
            return runner.logits(_tree_forward(runner, tokens, block)).argmax(-1)

        rows[str(nodes)] = timed(step, device, quick)
    return rows


@torch.no_grad()
def prefill_costs(model, device, quick: bool, scale_from: int | None) -> dict:
    """The drafter's k-layer prefill of the event tokens, the verifier's full prefill of the video tokens."""
    hidden = model.config.hidden_size
    results = {"event_tokens": EVENT_TOKENS + TEXT_TOKENS, "video_tokens": VIDEO_TOKENS + TEXT_TOKENS}

    def prefill(layers, tokens):
        embeds = torch.randn(1, tokens, hidden, device=device, dtype=model.dtype) * 0.02
        ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
        runner = ModelRunner(model, new_cache(model, 1, tokens + 8, layers), num_layers=layers)
        return timed(lambda: runner.prefill(ids, torch.ones_like(ids), embeds=embeds), device,
                     True if scale_from else quick)

    if scale_from:  # time 1 and N layers, scale linearly (labelled)
        for name, tokens in (("drafter", results["event_tokens"]), ("verifier", results["video_tokens"])):
            one, many = prefill(1, tokens), prefill(scale_from, tokens)
            per_layer = (many["median_ms"] - one["median_ms"]) / (scale_from - 1)
            base = one["median_ms"] - per_layer
            results[name] = {"per_layer_ms": per_layer, "fixed_ms": base,
                             "measured": {"1": one, str(scale_from): many},
                             "by_layers_ms": {str(k): base + k * per_layer for k in DEPTHS}}
        results["scaled_from_layers"] = scale_from
    else:
        results["drafter"] = {"by_layers": {str(k): prefill(k, results["event_tokens"]) for k in DEPTHS}}
        results["verifier"] = {"by_layers": {"32": prefill(None, results["video_tokens"])}}
    return results


@torch.no_grad()
def vision_costs(device, quick: bool, smoke: bool = False) -> dict:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2) if smoke else \
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
    config = CLIPVisionConfig(image_size=224, patch_size=14, projection_dim=768, **size)
    torch.manual_seed(0)
    tower = CLIPVisionModel(config).to(device=device, dtype=torch.bfloat16).eval()  # ~0.3B params: plain init
    rows = {}
    for name, images in (("eventgpt_event_images_5", 5), ("video_llava_frames_8", 8)):
        pixels = torch.randn(images, 3, 224, 224, device=device, dtype=torch.bfloat16)
        rows[name] = timed(lambda: tower(pixel_values=pixels), device, quick)
    return rows


@torch.no_grad()
def decode_steps(model, adapter, k: int, context: int, device, new_tokens: int, compiled: bool = False) -> dict:
    """SpeculativeDecoder on the 7B model (self-speculative, chain of 4): the per-step split, wall time per step
    (synchronized), and on CUDA the GPU's kernel time per step (profiler) beside it. compiled: torch.compile'd
    forwards (CUDA graphs on a GPU)."""
    decoder = sd.SpeculativeDecoder(model, model, adapter=adapter, tree=sd.TreeSpec.chain(4), draft_layers=k,
                                    compile=compiled)
    ids = torch.randint(1, 32000, (1, context), device=device)
    decoder.generate(ids, 8)  # warm-up (and, compiled, the compilation of every width)
    _sync(device)
    start = time.perf_counter()
    out = decoder.generate(ids, new_tokens)
    _sync(device)
    wall = time.perf_counter() - start
    timings, steps = out.stats["timings"], max(out.stats["steps"], 1)
    row = {"draft_layers": k, "compiled": compiled, "steps": out.stats["steps"], "wall_ms_per_step": 1e3 * wall / steps,
           "per_step_ms": {key: 1e3 * timings[key] / steps for key in ("draft_s", "verify_forward_s", "bookkeeping_s")},
           "bookkeeping_share_of_verify": out.stats["bookkeeping_share_of_verify"]}
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            traced = decoder.generate(ids, new_tokens)
            _sync(device)
        kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
        row["gpu_kernel_ms_per_step"] = kernel_us / 1e3 / max(traced.stats["steps"], 1)
    return row


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def projections(result: dict, sweep: dict | None, gammas=(1, 2, 3, 4, 5)) -> dict:
    """Projected speedups from the measured costs (ms); labelled as projections in the JSON."""
    verify = {int(n): v["median_ms"] for n, v in result["verify_cost"].items()}
    draft = {int(k): v["median_ms"] for k, v in result["draft_cost"].items()}
    bookkeeping = result["decode_step"]["per_step_ms"]["bookkeeping_s"]

    def speedup(a, k, gamma):
        step = verify[gamma + 1] if gamma + 1 in verify else verify[max(verify)]
        return expected_tokens(a, gamma) * verify[1] / (step + gamma * draft[k] + bookkeeping)

    table = {"note": "PROJECTED from measured costs and an assumed or measured per-draft acceptance a", "alpha": {}}
    for a in (0.3, 0.5, 0.7):
        table["alpha"][str(a)] = {str(k): max((speedup(a, k, g), g) for g in gammas) for k in draft}
    if sweep:
        table["embedded_default_acceptance"] = {}
        best_rows = {}  # each k's best measured acceptance over the compared variants
        for row in sweep["rows"]:
            if row["token_acceptance"] > best_rows.get(row["draft_layers"], {"token_acceptance": -1})["token_acceptance"]:
                best_rows[row["draft_layers"]] = row
        for k, row in sorted(best_rows.items()):
            a = row["token_acceptance"]
            if k in draft:
                best = max((speedup(a, k, g), g) for g in gammas)
                table["embedded_default_acceptance"][str(k)] = {"a": a, "speedup": best[0], "gamma": best[1]}
    return table


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ks = [int(k) for k in result["draft_cost"]]
    left.plot(ks, [v["median_ms"] for v in result["draft_cost"].values()], "o-", label="draft token (k layers)")
    left.axhline(result["verify_cost"]["1"]["median_ms"], color="grey", ls="--", label="verifier token (32 layers)")
    left.set_xscale("log", base=2)
    left.set_xlabel("draft_layers k")
    left.set_ylabel("ms")
    left.legend(fontsize=8)
    sizes = [int(n) for n in result["verify_cost"]]
    right.plot(sizes, [v["median_ms"] for v in result["verify_cost"].values()], "o-")
    right.set_xscale("log", base=2)
    right.set_xlabel("tree nodes in one verifier forward")
    right.set_ylabel("ms")
    fig.suptitle(f"Vicuna-7B architecture, bf16, {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--context", type=int, default=None, help="tokens already in the cache (default: 582 event "
                        "tokens + text on CUDA, 128 on CPU)")
    parser.add_argument("--prefill-layers", type=int, default=None, help="time prefill at 1 and N layers and scale "
                        "(default: 2 on CPU, off on CUDA)")
    parser.add_argument("--decode-layers", type=int, default=4, help="draft_layers of the decode-step split")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--sweep", default=os.path.join(RESULTS, "adapters_cpu.json"),
                        help="compare-adapters JSON whose per-k acceptance feeds the projection")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also the decode step with compiled forwards")
    parser.add_argument("--smoke", action="store_true", help="toy widths (a test of this script, not a benchmark)")
    parser.add_argument("--parts", nargs="*", default=None, help="only these parts (e.g. decode_step "
                        "decode_step_compiled); no projection then")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    context = args.context or (128 if cpu else EVENT_TOKENS + TEXT_TOKENS)
    scale_from = args.prefill_layers if args.prefill_layers is not None else (2 if cpu else None)
    started = time.time()
    config = vicuna_7b(args.smoke)
    model = random_model(config, device)
    adapter = sd.BottleneckAdapter(config.hidden_size, 256, dtype=torch.bfloat16, device=device)
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else cpu_name(),
              "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
              "dtype": "bfloat16", "context_tokens": context, "architecture": "SMOKE (toy width)" if args.smoke else "Vicuna-7B (LlamaConfig), random weights"}
    os.makedirs(RESULTS, exist_ok=True)
    out = args.out or os.path.join(RESULTS, f"e2e_{device.type}.json")

    def section(name, what, fn):
        """Run one part and write the JSON so far: a run cut short keeps what it measured."""
        if args.parts is not None and name not in args.parts:
            return
        print(f"{what} ...", flush=True)
        start = time.time()
        try:
            result[name] = fn()
        except Exception as exc:  # recorded, and the other parts still run
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        result.setdefault("section_seconds", {})[name] = time.time() - start
        with open(out, "w") as f:
            json.dump(result, f, indent=2)

    new_tokens = args.new_tokens or (8 if cpu else 64)
    section("draft_cost", "draft cost per token by k", lambda: draft_costs(model, adapter, context, device, args.quick))
    section("verify_cost", "verify cost by tree size", lambda: verify_costs(model, context, device, args.quick))
    section("prefill", "prefill", lambda: prefill_costs(model, device, args.quick, scale_from))
    section("vision", "vision towers", lambda: vision_costs(device, args.quick, args.smoke))
    section("decode_step", "decode steps", lambda: decode_steps(model, adapter, args.decode_layers, context, device,
                                                                new_tokens))
    if args.compile:
        section("decode_step_compiled", "decode steps, compiled",
                lambda: decode_steps(model, adapter, args.decode_layers, context, device, new_tokens, compiled=True))
    failed = [name for name, value in result.items() if isinstance(value, dict) and "error" in value]
    if args.parts is not None:
        print(json.dumps({part: result.get(part) for part in args.parts}, indent=2))
        return 1 if failed else 0
    if failed:
        print(f"parts that failed: {failed}", flush=True)
    if any(name in failed for name in ("draft_cost", "verify_cost", "decode_step")):
        return 1  # the projection needs these
    verify_one = result["verify_cost"]["1"]["median_ms"]
    result["draft_cost_ratio"] = {k: v["median_ms"] / verify_one for k, v in result["draft_cost"].items()}
    sweep = None
    if args.sweep and os.path.isfile(args.sweep):
        with open(args.sweep) as f:
            sweep = json.load(f)
        result["sweep_source"] = os.path.relpath(args.sweep, os.path.dirname(RESULTS))
    result["projected_speedup"] = projections(result, sweep)
    result["seconds"] = time.time() - started
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.splitext(out)[0] + ".png")
    print(json.dumps({"draft_cost_ratio": result["draft_cost_ratio"],
                      "verify_ms": {n: v["median_ms"] for n, v in result["verify_cost"].items()},
                      "decode_step": result["decode_step"]}, indent=2))
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
