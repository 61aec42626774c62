"""Few-row linear layers on the CPU: F.linear vs sdalign_rt.cpu_linear (torch.mm's small-N path for 1-2 rows,
the extension's few_row_linear for 3-8), with torch.mm's small-N path and few_row_linear also timed alone
at every row count (the evidence for cpu_linear's dispatch).

    python3 bench/bench_cpu_linear.py [--rounds 3] [--quick]

Shapes: SmolLM2-135M's projections (576 -> 1536, 1536 -> 576, 576 -> 576, 576 -> 192) and its LM head
(576 -> 49152), and a Vicuna-7B MLP projection (4096 -> 11008); rows 1 .. 9, fp32. Each small weight is
stacked in enough copies to exceed the last-level cache, as a real forward streams every layer's weights
once. Every provider is timed in the same round, rounds alternate their order, and the ratio quoted
(cpu_linear over F.linear) is the median over rounds. Writes bench/results/cpu_linear_cpu.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

from sdalign_rt import cpu_linear

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import time_cpu  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SHAPES = {"smollm2 576->1536": (1536, 576, 60), "smollm2 1536->576": (576, 1536, 30),
          "smollm2 576->576": (576, 576, 60), "smollm2 576->192": (192, 576, 60),
          "smollm2 head 576->49152": (49152, 576, 1), "vicuna-7b 4096->11008": (11008, 4096, 1)}


def _median_us(fn, reps: int) -> float:
    return time_cpu(fn, min_reps=reps, min_seconds=0.0, warmup=1, max_reps=reps)["median_us"]


def _small_n_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """MKL's small-N path, as cpu_linear calls it (one row duplicated to make two)."""
    rows = x if len(x) > 1 else x.expand(2, -1)
    return torch.mm(weight, rows.contiguous().T).T[: len(x)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="rows 1, 2, 4, 9 and fewer repetitions")
    parser.add_argument("--out", default=os.path.join(RESULTS, "cpu_linear_cpu.json"))
    args = parser.parse_args(argv)
    from sdalign_rt.demo.experiment import environment

    torch.set_grad_enabled(False)
    few_row = cpu_linear._few_row_op()  # the extension's op (None without it)
    row_counts = (1, 2, 4, 9) if args.quick else tuple(range(1, 10))
    reps = 5 if args.quick else 15
    result = {"environment": environment(), "rounds": args.rounds, "shapes": {}}
    for name, (out_features, in_features, copies) in SHAPES.items():
        weights = [torch.randn(out_features, in_features) for _ in range(copies)]
        rows = {}
        for count in row_counts:
            x = torch.randn(count, in_features)
            # cpu_linear's candidate kernels timed apart too, so the JSON shows why it dispatches as it does.
            providers = {"F.linear": torch.nn.functional.linear, "cpu_linear": cpu_linear.linear,
                         "torch.mm": _small_n_mm}
            if few_row is not None:
                providers["few_row_linear"] = few_row
            times = {provider: [] for provider in providers}
            for round_ in range(args.rounds):
                order = list(providers) if round_ % 2 == 0 else list(providers)[::-1]
                for provider in order:
                    fn = providers[provider]
                    times[provider].append(_median_us(lambda: [fn(x, w) for w in weights], reps) / copies)
            ratios = [a / b for a, b in zip(times["F.linear"], times["cpu_linear"])]
            row = {f"{provider}_us": statistics.median(values) for provider, values in times.items()}
            row.update(speedup_median=statistics.median(ratios),
                       weight_GBps_cpu_linear=out_features * in_features * 4 / row["cpu_linear_us"] / 1e3)
            rows[str(count)] = row
            print(f"{name:26s} rows {count}: " + ", ".join(f"{provider} {row[provider + '_us']:9.1f} us"
                                                           for provider in providers)
                  + f" (cpu_linear {row['speedup_median']:.2f}x F.linear)", flush=True)
        result["shapes"][name] = rows
        del weights
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    _plot(result, os.path.splitext(args.out)[0] + ".png")
    return 0


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in result["shapes"].items():
        counts = [int(c) for c in rows]
        ax.plot(counts, [rows[c]["speedup_median"] for c in rows], "o-", label=name)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axvline(cpu_linear.MAX_ROWS + 0.5, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("rows (tokens in the forward)")
    ax.set_ylabel("F.linear time / cpu_linear time")
    ax.set_title(f"fp32 CPU GEMM orientation ({result['environment']['processor']}, "
                 f"{result['environment']['threads']} threads)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
