"""Running vLLM in-process to measure it (the benchmarks and tests): its settings and its acceptance counters.

One engine per process: vLLM keeps process-wide state (its distributed groups, its compile caches), so each system
or test run gets a process of its own, and talks to its parent over stdout (`private_stdout`).
"""
from __future__ import annotations

import os
import sys

IN_PROCESS_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in this process: nothing else competes for the cores
    "VLLM_USE_V2_MODEL_RUNNER": "0",        # the V1 runner hosts EAGLE drafters on CPU
    "VLLM_CPU_KVCACHE_SPACE": "1",          # GiB; plenty for a conversation at a time
    "VLLM_LOGGING_LEVEL": "WARNING",
}
COUNTERS = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
            "vllm:spec_decode_num_accepted_tokens": "accepted"}


def configure(threads: int | None = None) -> None:
    """Set vLLM's in-process settings (before vLLM is imported). threads: OMP_NUM_THREADS for its CPU worker,
    which otherwise drops to one thread."""
    for key, value in IN_PROCESS_ENV.items():
        os.environ.setdefault(key, value)
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def private_stdout():
    """A file on the process's original stdout, for a line protocol; fd 1 and sys.stdout then go to stderr, so
    vLLM's logs and any C-level print cannot corrupt the protocol."""
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return channel


def spec_counters(llm) -> dict:
    """vLLM's speculative-decoding counters so far: drafts (steps that drafted), draft_tokens, accepted, and
    per_position (accepted drafts at each depth). Needs LLM(..., disable_log_stats=False)."""
    counts = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "per_position": []}
    for metric in llm.get_metrics():
        if metric.name in COUNTERS:
            counts[COUNTERS[metric.name]] = int(metric.value)
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            counts["per_position"] = [int(v) for v in metric.values]
    return counts


def counters_since(before: dict, after: dict) -> dict:
    """The counters' growth between two spec_counters() readings."""
    grown = {key: after[key] - before[key] for key in ("drafts", "draft_tokens", "accepted")}
    old = before["per_position"]
    grown["per_position"] = [a - (old[i] if i < len(old) else 0) for i, a in enumerate(after["per_position"])]
    return grown
