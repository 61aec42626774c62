"""Microbenchmark of every op at 7B dims: Triton vs eager PyTorch (the reference) vs torch.compile vs C++.

    python bench/bench_kernels.py                 # CPU: reference and C++ paths; GPU: Triton, eager, compile
    python bench/bench_kernels.py --quick         # fewer shapes
    python bench/bench_kernels.py --resume        # keep rows already in the output JSON

Shapes: D=4096, R=256, T in 1/5/16/64, trees of 8/32/64 nodes, batch 1 and 8, vocab 32000, KV cache of
32 layers x K/V x 32 heads x 128; tree_attention: the tree's N nodes in one layer's 32 heads of 128 over a
630-token context in a 768-slot cache (the reference is attention under the dense mask). Every sample is one Python call (launch and validation overhead
included; content checks off, as in the decoding loop). Writes bench/results/kernels_<device>.json (rows
with median / p10 / p90 microseconds) and the PNG drawn from it. Triton timings need a GPU: under
TRITON_INTERPRET=1 the kernels run in a Python interpreter and their times mean nothing, so on CPU the
Triton provider is skipped and the JSON says so.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plot  # noqa: E402
import timing  # noqa: E402

import sdalign_rt as sd  # noqa: E402
from sdalign_rt import _ext, reference  # noqa: E402

HIDDEN, BOTTLENECK, VOCAB = 4096, 256, 32000
LAYERS, HEADS, HEAD_DIM = 32, 32, 128
DENSE_OPS = ("fused_adapter", "cosine_accept", "adapter_cosine_accept")
TREE_OPS = ("build_tree", "verify_tree_greedy", "verify_tree_sampling", "kv_compact", "tree_attention")
CPP_OPS = ("build_tree", "verify_tree_greedy", "verify_tree_sampling", "kv_compact")  # the ops csrc/ implements
ATTENTION_CAPACITY, ATTENTION_CONTEXT = 768, 630  # a 630-token context (the 7B step's) in a 768-slot cache
# Ops whose call has no host sync when given their planned shapes (build_tree: num_leaves / max_depth).
# Ops whose launcher picks a decode-size split path by row count; "triton_fused" forces the one-launch path.
SPLIT_OPS = ("fused_adapter", "adapter_cosine_accept")
GRAPHABLE = {"fused_adapter", "cosine_accept", "adapter_cosine_accept", "build_tree", "verify_tree_greedy",
             "kv_compact", "tree_attention"}


def bushy_parents(n: int) -> list[int]:
    """A breadth-first tree with up to 3 children per node (the shape of EAGLE/Medusa static trees)."""
    return [-1] + [(i - 1) // 3 for i in range(1, n)]


def deep_parents(n: int, rng) -> list[int]:
    return [-1] + [i - 1 if rng.random() < 0.7 else int(rng.integers(0, i)) for i in range(1, n)]


def dense_case(op, batch, positions, dtype, device):
    gen = torch.Generator().manual_seed(batch * 100 + positions)
    a = torch.randn(batch, positions, HIDDEN, generator=gen).to(device, dtype)
    b = (a.float() + torch.randn(batch, positions, HIDDEN, generator=gen).to(device)).to(dtype)
    weights = (
        (torch.randn(BOTTLENECK, HIDDEN, generator=gen) * HIDDEN ** -0.5).to(device, dtype),
        (torch.randn(BOTTLENECK, generator=gen) * 0.1).to(device, dtype),
        (torch.randn(HIDDEN, BOTTLENECK, generator=gen) * BOTTLENECK ** -0.5).to(device, dtype),
        (torch.randn(HIDDEN, generator=gen) * 0.1).to(device, dtype),
    )
    if op == "fused_adapter":
        return (a, *weights), {}
    if op == "cosine_accept":
        return (a, b, 0.9, "consecutive"), {}
    return (a, b, *weights, 0.9, "consecutive"), {}


def tree_case(op, batch, nodes, dtype, device):
    rng = np.random.default_rng(nodes)
    rows = [bushy_parents(nodes) if b % 2 == 0 else deep_parents(nodes, rng) for b in range(batch)]
    parents = torch.tensor(rows, device=device)
    max_depth = int(reference.tree_depths(parents.cpu()).max())
    gen = torch.Generator().manual_seed(nodes)
    argmax = torch.randint(0, VOCAB, (batch, nodes), generator=gen)
    draft = torch.randint(0, VOCAB, (batch, nodes), generator=gen)
    for b, row in enumerate(rows):  # ~70% of drafts match their parent's argmax: realistic deep acceptance
        for i in range(1, nodes):
            if rng.random() < 0.7:
                draft[b, i] = argmax[b, row[i]]
    draft, argmax = draft.to(device), argmax.to(device)
    if op == "build_tree":
        num_leaves = max(sum(1 for i in range(nodes) if i not in set(row[1:])) for row in rows)
        return (parents, torch.full((batch,), 128, device=device)), {"num_leaves": num_leaves, "max_depth": max_depth}
    if op == "verify_tree_greedy":
        return (draft, parents, argmax), {"max_depth": max_depth}
    if op == "verify_tree_sampling":
        probs = torch.softmax(torch.randn(batch, nodes, VOCAB, generator=gen) * 3, -1).to(device)
        uniform = torch.rand(batch, nodes, generator=gen).to(device)
        return (draft, parents, probs, uniform), {"max_depth": max_depth}
    if op == "tree_attention":  # the verify forward's attention in one layer: N tree nodes over the context
        q = torch.randn(batch, HEADS, nodes, HEAD_DIM, generator=gen).to(device, dtype)
        keys, values = (torch.randn(batch, HEADS, ATTENTION_CAPACITY, HEAD_DIM, generator=gen).to(device, dtype)
                        for _ in range(2))
        block = sd.ops.build_tree(parents.cpu(), 0).mask[:, 0].to(device)  # [B, N, N] bool: self and ancestors
        context = torch.full((batch,), ATTENTION_CONTEXT, device=device)
        return (q, keys, values, torch.zeros_like(context), context, block, context, HEAD_DIM ** -0.5), {}
    accept_nodes = reference.verify_tree_greedy(draft.cpu(), parents.cpu(), argmax.cpu())[0].to(device)
    prefix = 64
    cache = torch.randn(LAYERS * 2, batch, HEADS, prefix + nodes, HEAD_DIM, dtype=dtype, device=device)
    return (cache, accept_nodes, torch.full((batch,), prefix, device=device)), {}


REFERENCE_FN = {
    "fused_adapter": reference.fused_adapter,
    "cosine_accept": reference.cosine_accept,
    "adapter_cosine_accept": reference.adapter_cosine_accept,
    "build_tree": reference.build_tree,
    "verify_tree_greedy": reference.verify_tree_greedy,
    "verify_tree_sampling": reference.verify_tree_sampling,
    "kv_compact": lambda cache, accept_nodes, prefix: reference.kv_compact([cache], accept_nodes, prefix),
    "tree_attention": reference.tree_attention,
}


def providers_for(op: str, device: torch.device, use_compile: bool) -> list[str]:
    names = ["reference"]
    if device.type == "cuda":
        names.append("triton")
        if op in GRAPHABLE:
            names.append("triton+graph")
        if op in SPLIT_OPS:  # the one-launch path at every size, beside the dispatcher's choice
            names += ["triton_fused", "triton_fused+graph"]
    elif op in CPP_OPS and _ext.cpp_available():
        names.append("cpp")
    if use_compile and op in DENSE_OPS:
        names.append("compile")
    return names


def make_call(op, provider, args, kwargs):
    if provider == "reference":
        fn = REFERENCE_FN[op]
        return lambda: fn(*args)
    if provider == "compile":
        torch._dynamo.reset()  # each case compiles afresh: no recompile-limit fallback to eager
        fn = torch.compile(REFERENCE_FN[op], dynamic=False)
        return lambda: fn(*args)
    if provider.startswith("triton_fused"):
        launch = getattr(importlib.import_module(f"sdalign_rt.kernels.{op}"), op)
        fused = lambda: launch(*args, split=False)  # noqa: E731
        return timing.cuda_graph(fused) if provider.endswith("+graph") else fused
    public = getattr(sd.ops, op)
    backend = "cpp" if provider == "cpp" else "triton"

    def call():
        with sd.ops.use_backend(backend), sd.ops.value_checks(False):
            return public(*args, **kwargs)

    return timing.cuda_graph(call) if provider == "triton+graph" else call


def device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for tag in ("h200", "h100", "a100", "l40", "4090"):
        if tag in name:
            return tag
    return "cuda"


def metadata(device: torch.device, dtype: torch.dtype) -> dict:
    import triton

    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)",
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda, "dtype": str(dtype).replace("torch.", ""), "cpp_extension": _ext.cpp_available(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(["python"] + sys.argv),
        "shapes": {"hidden": HIDDEN, "bottleneck": BOTTLENECK, "vocab": VOCAB, "kv_cache": [LAYERS, 2, HEADS, HEAD_DIM]},
        "timing": "one Python call per sample; CUDA events on GPU, wall clock on CPU; content checks off",
    }
    if device.type != "cuda":
        meta["notes"] = ("Triton timings need a GPU: under TRITON_INTERPRET=1 the kernels run in Python's "
                         "interpreter, so only the reference and C++ paths are timed here. CPU times are "
                         "machine-specific: compare them as ratios.")
    return meta


def cases(quick: bool, batches=(1, 8)):
    positions = (1, 16, 64) if quick else (1, 5, 16, 64)
    trees = (8, 64) if quick else (8, 32, 64)
    for op in DENSE_OPS:
        for batch in batches:
            for t in positions:
                yield op, batch, t, f"B{batch} T{t}"
    for op in TREE_OPS:
        for batch in batches:
            for n in trees:
                yield op, batch, n, f"B{batch} N{n}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="hidden-state / KV dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--compile", dest="use_compile", action="store_true", default=None,
                        help="also time torch.compile of the reference (default on GPU only)")
    parser.add_argument("--no-compile", dest="use_compile", action="store_false")
    parser.add_argument("--ops", nargs="*", default=None, help="only these ops")
    parser.add_argument("--providers", nargs="*", default=None, help="only these providers")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8], help="batch sizes (default 1 8)")
    parser.add_argument("--out", default=None, help="output JSON (default bench/results/kernels_<device>.json)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in the output JSON")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.pop("TRITON_INTERPRET", None)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    use_compile = args.use_compile if args.use_compile is not None else device.type == "cuda"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"kernels_{device_tag(device)}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    rows = []
    if args.resume and os.path.exists(out):
        with open(out) as f:
            rows = json.load(f)["rows"]
    done = {(r["op"], r["case"], r["provider"]) for r in rows}
    meta = metadata(device, dtype)
    if device.type == "cpu":
        print(meta["notes"])

    todo = [c for c in cases(args.quick, args.batches) if args.ops is None or c[0] in args.ops]
    for op, batch, size, label in tqdm(todo, desc="bench_kernels", unit="case"):
        providers = [p for p in providers_for(op, device, use_compile) if (op, label, p) not in done
                     and (args.providers is None or p in args.providers)]
        if not providers:
            continue
        build = dense_case if op in DENSE_OPS else tree_case
        case_args, kwargs = build(op, batch, size, dtype, device)
        for provider in providers:
            row = {"op": op, "case": label, "provider": provider, "batch": batch,
                   ("positions" if op in DENSE_OPS else "nodes"): size}
            try:
                row.update(timing.time_call(make_call(op, provider, case_args, kwargs), device))
            except Exception as exc:  # a provider that cannot run this case is recorded, not fatal
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
        with open(out, "w") as f:  # after every case: an interrupted run resumes with --resume
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        del case_args
    plot.plot_rows({"meta": meta, "rows": rows}, out.replace(".json", ".png"))
    print_table(rows)
    print(f"wrote {out} and {out.replace('.json', '.png')}")
    return 0


def print_table(rows) -> None:
    by_case = {}
    for r in rows:
        by_case.setdefault((r["op"], r["case"]), {})[r["provider"]] = r
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    print(f"{'op':24s} {'case':10s} " + " ".join(f"{p:>14s}" for p in providers) + "   (median us)")
    for (op, case), entries in by_case.items():
        cells = []
        for p in providers:
            r = entries.get(p)
            cells.append(f"{r['median_us']:14.1f}" if r and "median_us" in r else f"{'-' if not r else 'error':>14s}")
        print(f"{op:24s} {case:10s} " + " ".join(cells))


if __name__ == "__main__":
    raise SystemExit(main())
