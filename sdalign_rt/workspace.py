"""Workspaces: the caches and runners of one batch size and capacity, and the pool that hands them out.

A workspace is the expensive, reusable part of a decode call: the two models' static KV caches and their
runners (with compiled forwards and captured CUDA graphs inside its DecodeSteps). One generate call holds
one workspace from start to end; nothing in it is shared with another call while it is held. The pool keeps
idle workspaces between calls, so a decoder that serves one caller at a time allocates once, and several
threads calling one decoder at once each get their own workspace (memory grows with the peak number of
concurrent calls, and falls back when calls need a larger capacity and the idle small ones are dropped).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sdalign_rt.model_runner import ModelRunner, new_cache


def round_up(slots: int, multiple: int = 64) -> int:
    """Capacities come in buckets of `multiple` slots, so that similar prompts reuse one workspace."""
    return -(-slots // multiple) * multiple


@dataclass
class Workspace:
    batch: int
    verifier: ModelRunner
    drafter: ModelRunner | None  # None: plain decoding
    steps: dict = field(default_factory=dict)  # DecodeSteps over these caches, by (plan, sampling warp)

    @property
    def shared(self) -> bool:
        """The drafter reads and writes the verifier's cache (or there is no drafter)."""
        return self.drafter is None or self.drafter.cache is self.verifier.cache

    @classmethod
    def build(cls, target, draft, batch: int, verifier_slots: int, drafter_slots: int, *, shared: bool,
              draft_layers: int | None, lean: bool | None, compile: bool, graphs: bool) -> "Workspace":
        if shared:
            verifier_slots = max(verifier_slots, drafter_slots)
        verifier_cache = new_cache(target, batch, verifier_slots)
        verifier = ModelRunner(target, verifier_cache, lean=lean)
        draft_runner = None
        if draft is not None:
            drafter_cache = verifier_cache if shared else new_cache(draft, batch, drafter_slots, draft_layers)
            draft_runner = ModelRunner(draft, drafter_cache, num_layers=draft_layers, lean=lean)
        if compile:
            for runner in (verifier, draft_runner):
                if runner is not None:
                    # Inside a whole-step CUDA graph the forwards must not capture graphs of their own.
                    runner.compile(graphs=not graphs)
        return cls(batch, verifier, draft_runner)

    def fits(self, batch: int, verifier_slots: int, drafter_slots: int) -> bool:
        if self.shared:
            return batch == self.batch and self.verifier.cache.capacity >= max(verifier_slots, drafter_slots)
        return (batch == self.batch and self.verifier.cache.capacity >= verifier_slots
                and self.drafter.cache.capacity >= drafter_slots)


class WorkspacePool:
    """Idle workspaces of one decoder. `acquire` takes one that fits (or builds one, its capacities rounded up to
    64-slot buckets); `release` puts it back. Thread-safe: a held workspace belongs to one call only."""

    def __init__(self, build):
        self._build = build  # (batch, verifier_slots, drafter_slots) -> Workspace
        self._idle: list[Workspace] = []
        self._lock = threading.Lock()

    def acquire(self, batch: int, verifier_slots: int, drafter_slots: int) -> Workspace:
        verifier_slots, drafter_slots = round_up(verifier_slots), round_up(drafter_slots)
        with self._lock:
            for index, workspace in enumerate(self._idle):
                if workspace.fits(batch, verifier_slots, drafter_slots):
                    return self._idle.pop(index)
            # Idle workspaces of this batch that are too small would never be taken again by a call this large:
            # free their buffers before allocating (one caller whose prompts grow keeps one workspace).
            self._idle = [w for w in self._idle if w.batch != batch]
        return self._build(batch, verifier_slots, drafter_slots)

    def release(self, workspace: Workspace) -> None:
        with self._lock:
            self._idle.append(workspace)

    def idle(self) -> list[Workspace]:
        """The idle workspaces (for inspection: tests, benchmarks)."""
        with self._lock:
            return list(self._idle)
