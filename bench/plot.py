"""Draws a benchmark JSON (rows of op / case / provider / median with p10-p90) as one bar panel per op."""
from __future__ import annotations

import json
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_rows(data: dict, path: str) -> None:
    rows = data["rows"]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 2.8 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        op_rows = [r for r in rows if r["op"] == op and "median_us" in r]
        cases = list(dict.fromkeys(r["case"] for r in op_rows))
        providers = list(dict.fromkeys(r["provider"] for r in op_rows))
        by = defaultdict(dict)
        for r in op_rows:
            by[r["provider"]][r["case"]] = r
        width = 0.8 / max(1, len(providers))
        for k, provider in enumerate(providers):
            xs, ys, lo, hi = [], [], [], []
            for i, case in enumerate(cases):
                r = by[provider].get(case)
                if r is None:
                    continue
                xs.append(i + (k - (len(providers) - 1) / 2) * width)
                ys.append(r["median_us"])
                lo.append(r["median_us"] - r["p10_us"])
                hi.append(r["p90_us"] - r["median_us"])
            ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=2, label=provider)
        ax.set_yscale("log")
        ax.set_ylabel("us / call")
        ax.set_title(op, fontsize=10)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, fontsize=7, rotation=20)
        ax.legend(fontsize=7, loc="upper left")
    meta = data["meta"]
    fig.suptitle(f"sdalign_rt kernels on {meta['device']} (median, p10-p90; torch {meta['torch']})", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    source = sys.argv[1]
    with open(source) as f:
        plot_rows(json.load(f), sys.argv[2] if len(sys.argv) > 2 else source.replace(".json", ".png"))
