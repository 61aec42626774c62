"""Input validation at the op boundary: every problem becomes a ValueError that names the argument.

Shape, dtype and device checks are free. Value checks (finite hidden states, tree structure, token ranges)
read tensor contents; on CUDA that is a host sync, so the decoding loop turns them off with
`value_checks(False)` once its inputs are known to be well formed.
"""
from __future__ import annotations

import contextlib
import threading

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
ACCEPT_MODES = ("consecutive", "relaxed")

_state = threading.local()


def value_checks_enabled() -> bool:
    return getattr(_state, "value_checks", True)


@contextlib.contextmanager
def value_checks(enabled: bool):
    """Turn the content checks (finite values, tree structure, index ranges) on or off in this thread."""
    previous = value_checks_enabled()
    _state.value_checks = enabled
    try:
        yield
    finally:
        _state.value_checks = previous


def tensor(name: str, value, *, ndim: int | None = None, min_ndim: int | None = None, dtypes=None):
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    return value


def shape(name: str, value: torch.Tensor, expected: tuple, what: str = ""):
    if tuple(value.shape) != tuple(expected):
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{hint}, got {tuple(value.shape)}")


def same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {listed}")


def finite(name: str, value: torch.Tensor):
    if value_checks_enabled() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


def threshold(value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"threshold must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number, got {value!r}") from None
    if value != value:
        raise ValueError("threshold must not be nan")
    return value


def accept_mode(mode: str) -> str:
    if mode not in ACCEPT_MODES:
        raise ValueError(f"mode must be one of {ACCEPT_MODES}, got {mode!r}")
    return mode


def adapter_weights(hidden: int, w_down, b_down, w_up, b_up) -> int:
    """Check the bottleneck weights against the hidden size; returns the bottleneck R."""
    tensor("w_down", w_down, ndim=2, dtypes=FLOAT_DTYPES)
    tensor("w_up", w_up, ndim=2, dtypes=FLOAT_DTYPES)
    bottleneck = w_down.shape[0]
    shape("w_down", w_down, (bottleneck, hidden), "[R, D] with D the hidden size of x")
    shape("w_up", w_up, (hidden, bottleneck), "[D, R]")
    if w_down.dtype != w_up.dtype:
        raise ValueError(f"w_down and w_up must share a dtype, got {w_down.dtype} and {w_up.dtype}")
    if b_down is not None:
        tensor("b_down", b_down, ndim=1, dtypes=FLOAT_DTYPES)
        shape("b_down", b_down, (bottleneck,), "[R]")
    if b_up is not None:
        tensor("b_up", b_up, ndim=1, dtypes=FLOAT_DTYPES)
        shape("b_up", b_up, (hidden,), "[D]")
    return bottleneck


def prefix_lengths(value, batch: int, device) -> torch.Tensor:
    """prefix_len as an int64 tensor [B] on `device` (ints broadcast)."""
    if isinstance(value, int):
        return torch.full((batch,), value, dtype=torch.int64, device=device)
    tensor("prefix_len", value, dtypes=INDEX_DTYPES)
    if value.dim() == 0:
        value = value.expand(batch)
    shape("prefix_len", value, (batch,), "one length per batch row")
    if value.device != torch.device(device):
        raise ValueError(f"prefix_len must be on {device}, got {value.device}")
    if value_checks_enabled() and bool((value < 0).any()):
        raise ValueError("prefix_len must be >= 0")
    return value.long()


def tree_parents(parents) -> torch.Tensor:
    """parents[B, N]: parents[b, 0] == -1 and 0 <= parents[b, i] < i for i > 0 (parents precede children)."""
    tensor("parents", parents, ndim=2, dtypes=INDEX_DTYPES)
    if parents.shape[1] < 1:
        raise ValueError("parents must have at least one node (the root)")
    if parents.shape[0] < 1:
        raise ValueError("parents must have at least one batch row")
    if value_checks_enabled():
        p = parents.long().cpu()
        if bool((p[:, 0] != -1).any()):
            row = int(torch.nonzero(p[:, 0] != -1)[0])
            raise ValueError(f"parents is not a tree: parents[{row}, 0] must be -1 (the root), got {int(p[row, 0])}")
        index = torch.arange(p.shape[1]).view(1, -1)
        bad = (p[:, 1:] < 0) | (p[:, 1:] >= index[:, 1:])
        if bool(bad.any()):
            b, i = (int(v) for v in torch.nonzero(bad)[0])
            raise ValueError(
                f"parents is not a tree: parents[{b}, {i + 1}] = {int(p[b, i + 1])}, expected a node index in "
                f"[0, {i + 1}) (every node's parent must precede it)"
            )
    return parents


def token_ids(name: str, value, batch: int, nodes: int, vocab: int | None = None) -> torch.Tensor:
    tensor(name, value, ndim=2, dtypes=INDEX_DTYPES)
    shape(name, value, (batch, nodes), "[B, N], one token per tree node")
    if vocab is not None and value_checks_enabled():
        v = value[:, 1:] if name == "draft_tokens" else value  # the root token is never tested
        if v.numel() and bool(((v < 0) | (v >= vocab)).any()):
            raise ValueError(f"{name} must hold token ids in [0, {vocab}), got values outside it")
    return value


def probabilities(name: str, value, batch: int, nodes: int) -> torch.Tensor:
    tensor(name, value, ndim=3, dtypes=FLOAT_DTYPES)
    if tuple(value.shape[:2]) != (batch, nodes):
        raise ValueError(f"{name} must have shape ({batch}, {nodes}, V), got {tuple(value.shape)}")
    if value_checks_enabled():
        finite(name, value)
        if bool((value < 0).any()):
            raise ValueError(f"{name} must be non-negative")
        if bool((value.float().sum(-1) <= 0).any()):
            raise ValueError(f"{name} has a node whose distribution sums to 0")
    return value


def accept_path(accept_nodes, batch: int | None = None) -> torch.Tensor:
    """accept_nodes[B, M]: each row starts at node 0, strictly increases, then is padded with -1."""
    tensor("accept_nodes", accept_nodes, ndim=2, dtypes=INDEX_DTYPES)
    if batch is not None and accept_nodes.shape[0] != batch:
        raise ValueError(f"accept_nodes must have {batch} rows (the cache batch), got {accept_nodes.shape[0]}")
    if value_checks_enabled() and accept_nodes.numel():
        a = accept_nodes.long().cpu()
        valid = a >= 0
        if bool((a[:, 0] != 0).any()):
            raise ValueError("accept_nodes rows must start with the root node 0")
        if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            raise ValueError("accept_nodes must be padded with -1 only after the accepted path")
        increasing = (a[:, 1:] > a[:, :-1]) | ~valid[:, 1:]
        if bool((~increasing).any()):
            raise ValueError("accept_nodes must be a root-to-node path (strictly increasing node indices)")
        if bool((a < -1).any()):
            raise ValueError("accept_nodes may hold node indices and -1 padding only")
    return accept_nodes
