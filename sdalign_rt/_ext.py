"""Loads the optional C++ extension (csrc/) once and says why when it is absent."""
from __future__ import annotations

import importlib

import torch

CPP_OPS = ("build_tree", "verify_tree_greedy", "verify_tree_sampling", "kv_compact_indices", "kv_compact_")

_loaded: bool | None = None
load_error: str | None = None


def cpp_available() -> bool:
    global _loaded, load_error
    if _loaded is None:
        try:
            importlib.import_module("sdalign_rt._C")
            for name in CPP_OPS:
                getattr(torch.ops.sdalign_rt, name)
            _loaded = True
        except (ImportError, OSError, AttributeError, RuntimeError) as exc:
            _loaded, load_error = False, f"{type(exc).__name__}: {exc}"
    return _loaded


def has_op(name: str) -> bool:
    """Whether the loaded extension registers `name` (an extension built by an older checkout may lack it)."""
    return hasattr(torch.ops.sdalign_rt, name)


def cpp_op(name: str):
    return getattr(torch.ops.sdalign_rt, name)
