"""Timers for the benchmarks: every sample is one Python call of the op, so launch overhead is included.

CPU: wall clock per call. CUDA: a pair of CUDA events around each call (the GPU-side interval, which
includes the host's launch latency whenever the GPU waits for it), plus wall clock with a synchronize.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _summary(samples_us: list[float]) -> dict:
    ordered = sorted(samples_us)

    def pct(q):
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"median_us": statistics.median(ordered), "p10_us": pct(0.1), "p90_us": pct(0.9), "reps": len(ordered)}


def time_cpu(fn: Callable[[], object], *, min_reps: int = 10, min_seconds: float = 0.2, warmup: int = 2,
             max_reps: int = 2000) -> dict:
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return _summary(samples)


def time_cuda(fn: Callable[[], object], *, reps: int = 200, warmup: int = 20) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    result = _summary([start.elapsed_time(end) * 1e3 for start, end in events])
    walls = []
    for _ in range(min(reps, 50)):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e6)
    result["wall_median_us"] = statistics.median(walls)
    return result


def cuda_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """Capture fn (which must not sync with the host) once; the returned callable replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_call(fn: Callable[[], object], device: torch.device) -> dict:
    return time_cuda(fn) if device.type == "cuda" else time_cpu(fn)
