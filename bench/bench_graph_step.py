"""The decode step at Vicuna-7B dims, eager vs captured whole as a CUDA graph, and one-token decoding vs HF.

    python3 bench/bench_graph_step.py --device cuda [--out bench/results/graph_step_h200.json]
    python3 bench/bench_graph_step.py --smoke          # the CPU dry run: toy width, no graphs, every part once

Model: the Vicuna-7B architecture (LlamaConfig, 32 layers, hidden 4096), bf16, random weights; drafting from its
own first 4 layers through a BottleneckAdapter(4096, 256) (self-speculative; random weights accept ~nothing, which
does not change a step's cost); 630 context tokens.

Parts (each writes its key of the JSON as soon as it is done):
  decode_step      per (batch 1 / 4, chain of 4 / 8-node tree, eager / graphed; and batch 1 chain with SDPA over
                   the dense mask instead of sd.ops.tree_attention): wall ms per step (a whole step
                   with its read-back), GPU kernel ms per step (profiler), and the parts' times. Eager parts are
                   synchronized wall clocks; graphed parts are three graphs (draft, verify forward, accept + commit)
                   replayed in turn between CUDA events. bookkeeping_share_of_verify = accept + commit + read-back
                   over the verify forward. `decode_step_eager` / `decode_step_graphed` are the batch-1 chain rows.
  one_token_decode ours (draft=None, graphed where CUDA) vs HF generate with a static cache + torch.compile and HF
                   generate eager, same weights, tokens/s of the decode (prefill excluded: a 1-token generate is
                   subtracted), interleaved over rounds, medians.
  adapter_cosine   sd.ops.adapter_cosine_accept inside a CUDA graph at T = 1 and 5 positions.
Targets (issue 22): graphed wall <= 1.3x its GPU kernel time; bookkeeping <= 3% of the verify forward; one-token
>= 150 tokens/s on an H200 and ahead of HF static + compile; adapter + cosine <= 10 us in a graph.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import sdalign_rt as sd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import random_model, vicuna_7b  # noqa: E402
from timing import cuda_graph, time_cuda  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONTEXT = 630
DRAFT_LAYERS = 4
TREES = {"chain4": sd.TreeSpec.chain(4),
         "tree8": sd.TreeSpec.static([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kernel_ms(fn, device, repeats: int) -> float | None:
    """GPU kernel time of `repeats` calls of fn (torch profiler, CUDA activity), per call."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        _sync(device)
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / repeats


def _parts_eager(step, device, repeats: int) -> dict:
    """Synchronized wall clocks around the eager parts of `repeats` steps (medians)."""
    parts = {"draft": [], "verify_forward": [], "bookkeeping": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        draft = step.draft()
        _sync(device)
        t1 = time.perf_counter()
        hidden, logits = step.verify_forward(draft)
        _sync(device)
        t2 = time.perf_counter()
        step.commit(draft, step.accept(draft, hidden, logits))
        step.read_back()
        t3 = time.perf_counter()
        for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[name].append(1e3 * seconds)
    return {name: statistics.median(values) for name, values in parts.items()}


def _parts_graphed(step, device, repeats: int) -> dict:
    """The step as three graphs (draft, verify forward, accept + commit), replayed in turn; each part's GPU
    interval between CUDA events (the read-back's host copy is added to bookkeeping by wall clock)."""
    restore = step.snapshot()
    held = {}

    def draft():
        held["draft"] = step.draft()

    def verify():
        held["out"] = step.verify_forward(held["draft"])

    def commit():
        step.commit(held["draft"], step.accept(held["draft"], *held["out"]))

    pool = torch.cuda.graph_pool_handle()
    graphs = []
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            draft(), verify(), commit()
            restore()
    torch.cuda.current_stream().wait_stream(stream)
    for fn in (draft, verify, commit):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            fn()
        graphs.append(graph)
    times = {"draft": [], "verify_forward": [], "bookkeeping": []}
    for _ in range(repeats):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        events[0].record()
        for graph, event in zip(graphs, events[1:]):
            graph.replay()
            event.record()
        t0 = time.perf_counter()
        step.read_back()  # waits for the replays too: only its own copy is added below
        _sync(device)
        readback_ms = 1e3 * (time.perf_counter() - t0)
        for name, (a, b) in zip(times, zip(events, events[1:])):
            times[name].append(a.elapsed_time(b))
        times["bookkeeping"][-1] += min(readback_ms, 0.05)  # the pinned copy: microseconds
    del graphs
    return {name: statistics.median(values) for name, values in times.items()}


def decode_step_row(model, adapter, batch: int, tree: str, graphed: bool, device, steps: int,
                    attention: str = "auto") -> dict:
    previous = os.environ.get("SDALIGN_RT_ATTENTION")
    os.environ["SDALIGN_RT_ATTENTION"] = attention  # read when the runners are built (the session below)
    try:
        return _decode_step_row(model, adapter, batch, tree, graphed, device, steps, attention)
    finally:
        if previous is None:
            os.environ.pop("SDALIGN_RT_ATTENTION")
        else:
            os.environ["SDALIGN_RT_ATTENTION"] = previous


def _decode_step_row(model, adapter, batch, tree, graphed, device, steps, attention) -> dict:
    decoder = sd.SpeculativeDecoder(model, model, adapter=adapter, tree=TREES[tree], draft_layers=DRAFT_LAYERS,
                                    graphs=None if graphed else False)
    ids = torch.randint(1, model.config.vocab_size, (batch, CONTEXT), device=device)
    mask = torch.ones_like(ids)
    slots = CONTEXT + 6 * (3 * steps + 16)
    row = {"batch": batch, "tree": tree, "nodes": TREES[tree].num_nodes, "graphed": graphed,
           "draft_layers": DRAFT_LAYERS, "context": CONTEXT, "attention": attention}
    with sd.ops.value_checks(False), decoder.session(batch, slots) as step:
        step.prefill(ids, mask)
        start = time.perf_counter()
        step.step()  # captures the graph (graphed) or warms up (eager)
        _sync(device)
        row["first_step_s"] = time.perf_counter() - start
        row["graphed"] = step.graph is not None
        start = time.perf_counter()
        for _ in range(steps):
            step.step()
        _sync(device)
        row["wall_ms_per_step"] = 1e3 * (time.perf_counter() - start) / steps
        row["gpu_kernel_ms_per_step"] = _kernel_ms(step.step, device, max(steps // 2, 1))
        parts = (_parts_graphed if row["graphed"] else _parts_eager)(step, device, steps)
    row["parts_ms"] = parts
    row["bookkeeping_share_of_verify"] = parts["bookkeeping"] / parts["verify_forward"]
    if row["gpu_kernel_ms_per_step"]:
        row["wall_over_kernel"] = row["wall_ms_per_step"] / row["gpu_kernel_ms_per_step"]
    return row


def one_token_decode(model, device, new_tokens: int, rounds: int, smoke: bool, progress=lambda partial: None) -> dict:
    """Tokens/s of the decode alone (generate of new_tokens + 1 minus generate of 1), interleaved, medians.
    HF's static cache + compile warms up last (its compile is the slow part): `progress` gets the figures so far
    after every warm-up and round, so a timeout still leaves them."""
    ids = torch.randint(1, model.config.vocab_size, (1, CONTEXT), device=device)
    ours = sd.SpeculativeDecoder(model, None)
    systems = {"ours": lambda n: ours.generate(ids, n).sequences,
               "hf_eager": lambda n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)}
    if device.type == "cuda" and not smoke:
        systems["hf_static_compile"] = lambda n: model.generate(
            ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static")  # auto-compiled
    outputs, samples, warmup_s = {}, {name: [] for name in systems}, {}
    for name, run in systems.items():  # warm-up: captures, compiles
        start = time.perf_counter()
        run(1), run(new_tokens + 1)
        _sync(device)
        warmup_s[name] = time.perf_counter() - start
        progress({"warmup_s": dict(warmup_s)})
    for _ in range(rounds):
        for name, run in systems.items():
            _sync(device)
            t0 = time.perf_counter()
            run(1)
            _sync(device)
            t1 = time.perf_counter()
            outputs[name] = run(new_tokens + 1)
            _sync(device)
            t2 = time.perf_counter()
            samples[name].append(new_tokens / max((t2 - t1) - (t1 - t0), 1e-9))
        progress({"by_round": {k: list(v) for k, v in samples.items()}, "warmup_s": dict(warmup_s)})
    result = {f"{name}_tokens_per_s": statistics.median(values) for name, values in samples.items()}
    result["by_round"] = samples
    result["warmup_s"] = warmup_s
    result["identical_to_hf_eager"] = {name: bool(torch.equal(out, outputs["hf_eager"])) for name, out in outputs.items()}
    result["ours_graphed"] = device.type == "cuda"
    result["new_tokens"], result["rounds"] = new_tokens, rounds
    return result


def adapter_cosine_rows(device, smoke: bool) -> list:
    hidden, bottleneck = (64, 16) if smoke else (4096, 256)
    rows = []
    gen = torch.Generator(device).manual_seed(0)
    for positions in (1, 5):
        a = torch.randn(1, positions, hidden, device=device, dtype=torch.bfloat16, generator=gen)
        b = torch.randn(1, positions, hidden, device=device, dtype=torch.bfloat16, generator=gen)
        w = [torch.randn(bottleneck, hidden, device=device, dtype=torch.bfloat16, generator=gen) * 0.02,
             torch.zeros(bottleneck, device=device, dtype=torch.bfloat16),
             torch.randn(hidden, bottleneck, device=device, dtype=torch.bfloat16, generator=gen) * 0.02,
             torch.zeros(hidden, device=device, dtype=torch.bfloat16)]

        def op():
            return sd.ops.adapter_cosine_accept(a, b, *w, 0.9, "consecutive")

        if device.type == "cuda":
            with sd.ops.value_checks(False):
                stats = time_cuda(cuda_graph(op), reps=200, warmup=20)
            rows.append({"op": "adapter_cosine_accept", "provider": "triton+graph", "positions": positions,
                         "median_us": stats["median_us"], "p10_us": stats["p10_us"], "p90_us": stats["p90_us"]})
        else:
            start = time.perf_counter()
            op()
            rows.append({"op": "adapter_cosine_accept", "provider": "cpu (dry run)", "positions": positions,
                         "median_us": 1e6 * (time.perf_counter() - start)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="toy width on the CPU: every part once")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--parts", default="adapter_cosine,decode_step,one_token_decode")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    smoke = args.smoke
    steps = args.steps or (3 if smoke else 30)
    out = args.out or os.path.join(RESULTS, f"graph_step_{'smoke' if smoke else device.type}.json")
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "model": "Vicuna-7B architecture, bf16, random weights" if not smoke
              else "Vicuna-7B layer count at toy width (dry run)", "context": CONTEXT, "draft_layers": DRAFT_LAYERS,
              "command": "python3 bench/bench_graph_step.py " + " ".join(argv if argv is not None else sys.argv[1:])}

    def write():
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)

    parts = args.parts.split(",")
    if "adapter_cosine" in parts:
        result["adapter_cosine"] = adapter_cosine_rows(device, smoke)
        write()
        print("adapter_cosine", result["adapter_cosine"], flush=True)
    model = random_model(vicuna_7b(smoke), device, torch.float32 if smoke and device.type == "cpu" else torch.bfloat16)
    hidden = model.config.hidden_size
    adapter = sd.BottleneckAdapter(hidden, min(256, hidden // 4), device=device, dtype=model.dtype)
    if "decode_step" in parts:
        rows = []
        for batch in (1, 4):
            for tree in TREES:
                for graphed in ((False, True) if device.type == "cuda" else (False,)):
                    row = decode_step_row(model, adapter, batch, tree, graphed, device, steps)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    result["decode_step"] = rows
                    write()
        if device.type == "cuda":  # the same step with SDPA over the dense mask instead of tree_attention
            for graphed in (False, True):
                row = decode_step_row(model, adapter, 1, "chain4", graphed, device, steps, attention="sdpa")
                rows.append(row)
                print(json.dumps(row), flush=True)
                result["decode_step"] = rows
                write()
        first = [r for r in rows if r["batch"] == 1 and r["tree"] == "chain4" and r["attention"] == "auto"]
        result["decode_step_eager"] = next((r for r in first if not r["graphed"]), None)
        result["decode_step_graphed"] = next((r for r in first if r["graphed"]), None)
        write()
    if "one_token_decode" in parts:
        def partial(figures):
            result["one_token_decode"] = {"partial": True, **figures}
            write()

        result["one_token_decode"] = one_token_decode(model, device, 16 if smoke else 128, 1 if smoke else 3, smoke,
                                                      partial)
        write()
        print("one_token_decode", json.dumps(result["one_token_decode"]), flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
