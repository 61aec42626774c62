"""The one dispatch point of every op: validation at the boundary, then a backend.

Backends: "triton" (the kernels in kernels/, for CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
"cpp" (the C++ ops of csrc/ for the tree ops; ATen, i.e. the reference, for the dense ops, which are
matmuls and reductions ATen already runs well on CPU), and "reference" (sdalign_rt/reference.py).
SDALIGN_RT_BACKEND=auto|triton|cpp|reference picks one for every op; `use_backend` does it in code.
"auto" is Triton for CUDA tensors, C++ for CPU tensors when the extension is built, else the reference.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os

import torch

from sdalign_rt import _ext, checks, reference
from sdalign_rt.checks import value_checks
from sdalign_rt.tree_masks import TreeMasks

__all__ = [
    "fused_adapter", "cosine_accept", "adapter_cosine_accept", "build_tree", "verify_tree_greedy",
    "verify_tree_sampling", "kv_compact", "tree_attention", "BACKENDS", "get_backend", "set_backend", "use_backend",
    "available_backends", "value_checks", "resolve_backend",
]

BACKENDS = ("auto", "triton", "cpp", "reference")
MAX_HIDDEN = 8192  # the adapter kernel's limits (registers for the [rows, R] bottleneck)
MAX_BOTTLENECK = 512
MAX_TREE_NODES = 128  # the tree kernels hold an N x N tile per program
MAX_ATTENTION_ROWS = 128  # tree_attention: G * T query rows per program (kernels/tree_attention.py)

_backend_override: str | None = None


def get_backend() -> str:
    name = _backend_override or os.environ.get("SDALIGN_RT_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"SDALIGN_RT_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for every op in this process (None: back to SDALIGN_RT_BACKEND / auto)."""
    global _backend_override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend_override = name


@contextlib.contextmanager
def use_backend(name: str | None):
    previous = _backend_override
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_triton_error: str | None = None


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    global _triton_error
    try:
        importlib.import_module("triton")
        return True
    except ImportError as exc:
        _triton_error = str(exc)
        return False


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on tensors of `device` in this process."""
    device = torch.device(device)
    names = ["reference"]
    if device.type == "cpu" and _ext.cpp_available():
        names.append("cpp")
    if triton_available() and (device.type == "cuda" or _interpreting()):
        names.append("triton")
    return names


def _kernels(name: str):
    return importlib.import_module(f"sdalign_rt.kernels.{name}")


def resolve_backend(op: str, device: torch.device, *, has_cpp: bool, triton_ok: str | None = None) -> str:
    """The backend that runs `op` on `device`. triton_ok: None if the kernel handles this input, else why not."""
    choice = get_backend()
    if choice == "auto":
        if device.type == "cuda" and triton_available() and triton_ok is None:
            return "triton"
        if device.type == "cpu" and has_cpp and _ext.cpp_available():
            return "cpp"
        return "reference"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: SDALIGN_RT_BACKEND=triton but triton cannot be imported ({_triton_error})")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(f"{op}: the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                               f"triton is imported to run the kernels on {device.type} tensors")
        if triton_ok is not None:
            raise ValueError(f"{op}: the Triton kernel does not handle this input: {triton_ok}")
        return "triton"
    if choice == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"{op}: the cpp backend runs on CPU tensors, got {device.type} tensors")
        if not _ext.cpp_available():
            raise RuntimeError(f"{op}: SDALIGN_RT_BACKEND=cpp but the C++ extension is not built "
                               f"({_ext.load_error}); reinstall with a compiler and without SDALIGN_RT_NO_EXT=1")
        return "cpp" if has_cpp else "reference"
    return "reference"


def _adapter_limits(hidden: int, bottleneck: int) -> str | None:
    if hidden > MAX_HIDDEN:
        return f"hidden size {hidden} > {MAX_HIDDEN}"
    if bottleneck > MAX_BOTTLENECK:
        return f"bottleneck {bottleneck} > {MAX_BOTTLENECK}"
    return None


def fused_adapter(x, w_down, b_down, w_up, b_up):
    """The bottleneck adapter: y = x + gelu(x @ w_down.T + b_down) @ w_up.T + b_up.

    Parameters
    ----------
    x : [..., D] float32 / float16 / bfloat16, drafter hidden states (any leading dims).
    w_down : [R, D], b_down : [R] or None; w_up : [D, R], b_up : [D] or None. Weights share one float dtype.

    Returns
    -------
    y : [..., D] in x's dtype. Matmul operands in the weights' dtype, fp32 accumulation, exact erf GELU.

    Example
    -------
    >>> x = torch.ones(1, 2, 4)
    >>> w_down, w_up = torch.zeros(3, 4), torch.zeros(4, 3)  # a zero up-projection is the identity
    >>> torch.equal(fused_adapter(x, w_down, None, w_up, None), x)
    True
    """
    checks.tensor("x", x, min_ndim=1, dtypes=checks.FLOAT_DTYPES)
    bottleneck = checks.adapter_weights(x.shape[-1], w_down, b_down, w_up, b_up)
    checks.same_device(x=x, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up)
    checks.finite("x", x)
    backend = resolve_backend("fused_adapter", x.device, has_cpp=False,
                              triton_ok=_adapter_limits(x.shape[-1], bottleneck))
    if backend == "triton":
        return _kernels("fused_adapter").fused_adapter(x, w_down, b_down, w_up, b_up)
    return reference.fused_adapter(x, w_down, b_down, w_up, b_up)


def _check_pair(a, b):
    checks.tensor("a", a, ndim=3, dtypes=checks.FLOAT_DTYPES)
    checks.tensor("b", b, ndim=3, dtypes=checks.FLOAT_DTYPES)
    checks.shape("b", b, tuple(a.shape), "the same [B, T, D] as a")
    checks.same_device(a=a, b=b)
    checks.finite("a", a)
    checks.finite("b", b)


def cosine_accept(a, b, threshold: float = 0.9, mode: str = "consecutive"):
    """Cosine similarity per position and the acceptance it implies.

    Parameters
    ----------
    a, b : [B, T, D] float32 / float16 / bfloat16, the same shape (adapted drafter and verifier states).
    threshold : float; mode : "consecutive" (n_accept counts the leading run) or "relaxed" (all accepted).

    Returns
    -------
    sims : [B, T] float32, clamped to [-1, 1], 0 for a zero-norm row, nan for a non-finite one (never accepted);
    accept : [B, T] bool, sims >= threshold; n_accept : [B] int64.

    Example
    -------
    >>> a = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    >>> b = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]]])
    >>> sims, accept, n = cosine_accept(a, b, 0.9, "consecutive")
    >>> accept.tolist(), n.tolist(), cosine_accept(a, b, 0.9, "relaxed")[2].tolist()
    ([[True, False, True]], [1], [2])
    """
    _check_pair(a, b)
    threshold, mode = checks.threshold(threshold), checks.accept_mode(mode)
    backend = resolve_backend("cosine_accept", a.device, has_cpp=False)
    if backend == "triton":
        return _kernels("cosine_accept").cosine_accept(a, b, threshold, mode)
    return reference.cosine_accept(a, b, threshold, mode)


def adapter_cosine_accept(a, b, w_down, b_down, w_up, b_up, threshold: float = 0.9, mode: str = "consecutive"):
    """fused_adapter(a) and cosine_accept(adapted, b) in one launch (the adapted states go to memory once).

    Parameters
    ----------
    a : [B, T, D] drafter states; b : [B, T, D] verifier states (float32 / float16 / bfloat16).
    w_down, b_down, w_up, b_up, threshold, mode : as in fused_adapter and cosine_accept.

    Returns
    -------
    (adapted [B, T, D] in a's dtype, sims [B, T] float32, accept [B, T] bool, n_accept [B] int64); the cosine is
    taken on `adapted` as stored.

    Example
    -------
    >>> a = torch.randn(1, 3, 8)
    >>> adapted, sims, accept, n = adapter_cosine_accept(a, a, torch.zeros(2, 8), None, torch.zeros(8, 2), None)
    >>> bool(accept.all()), n.tolist()  # an identity adapter: every state matches itself
    (True, [3])
    """
    _check_pair(a, b)
    bottleneck = checks.adapter_weights(a.shape[-1], w_down, b_down, w_up, b_up)
    checks.same_device(a=a, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up)
    threshold, mode = checks.threshold(threshold), checks.accept_mode(mode)
    backend = resolve_backend("adapter_cosine_accept", a.device, has_cpp=False,
                              triton_ok=_adapter_limits(a.shape[-1], bottleneck))
    if backend == "triton":
        return _kernels("adapter_cosine_accept").adapter_cosine_accept(
            a, b, w_down, b_down, w_up, b_up, threshold, mode)
    return reference.adapter_cosine_accept(a, b, w_down, b_down, w_up, b_up, threshold, mode)


def _tree_limit(n: int) -> str | None:
    return f"{n} tree nodes > {MAX_TREE_NODES}" if n > MAX_TREE_NODES else None


def _row_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def build_tree(parents, prefix_len=0, *, num_leaves: int | None = None, max_depth: int | None = None) -> TreeMasks:
    """Tree attention data for token trees on top of cached prefixes.

    Parameters
    ----------
    parents : [B, N] int32 / int64, parents[b, 0] == -1 (the root) and 0 <= parents[b, i] < i.
    prefix_len : [B] int32 / int64 or an int, tokens already cached per row.
    num_leaves, max_depth : int, optional exact hints (a planned static tree knows them): they fix retrieve's
        shape without reading the trees, which skips a host sync on CUDA and makes the call graph-capturable.

    Returns
    -------
    TreeMasks(positions [B, N] int64 = prefix + depth, mask [B, 1, N, N] bool (self and ancestors),
    bitmask [B, N, ceil(N / 32)] int32, retrieve [B, L, max_depth + 1] int64 root-to-leaf paths padded -1,
    depth [B, N] int64).

    Example
    -------
    >>> masks = build_tree(torch.tensor([[-1, 0, 0, 1]]), 7)
    >>> masks.positions.tolist(), masks.retrieve.tolist()
    ([[7, 8, 8, 9]], [[[0, 2, -1], [0, 1, 3]]])
    """
    checks.tree_parents(parents)
    batch, n = parents.shape
    prefix_len = checks.prefix_lengths(prefix_len, batch, parents.device)
    _check_tree_hints(parents, num_leaves, max_depth)
    backend = resolve_backend("build_tree", parents.device, has_cpp=True, triton_ok=_tree_limit(n))
    if backend == "triton":
        fields = _kernels("build_tree").build_tree(_row_contiguous(parents), prefix_len.contiguous(),
                                                   num_leaves=num_leaves, max_depth=max_depth)
    elif backend == "cpp":
        fields = _ext.cpp_op("build_tree")(parents, prefix_len)
    else:
        fields = reference.build_tree(parents, prefix_len)
    return TreeMasks(*fields)


def _check_tree_hints(parents, num_leaves, max_depth):
    """The hints must be exact: retrieve's shape is [B, num_leaves, max_depth + 1]."""
    for name, value in (("num_leaves", num_leaves), ("max_depth", max_depth)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if (num_leaves is None) != (max_depth is None):
        raise ValueError("pass num_leaves and max_depth together (or neither)")
    if num_leaves is not None and checks.value_checks_enabled():
        rows = parents.long().cpu()
        depth = int(reference.tree_depths(rows).max())
        leaves = max(int(sum(1 for i in range(rows.shape[1]) if i not in set(r[1:].tolist()))) for r in rows)
        if (num_leaves, max_depth) != (leaves, depth):
            raise ValueError(f"num_leaves={num_leaves}, max_depth={max_depth} do not describe these trees "
                             f"(they have {leaves} leaves at most and depth {depth})")


def _fit_width(accept_nodes: torch.Tensor, max_depth: int | None) -> torch.Tensor:
    """Give accept_nodes the contract's width max_depth + 1 (padding with -1 for a caller's larger max_depth)."""
    if max_depth is None:
        return accept_nodes
    width = max_depth + 1
    if accept_nodes.shape[1] >= width:
        return accept_nodes[:, :width]
    pad = accept_nodes.new_full((accept_nodes.shape[0], width - accept_nodes.shape[1]), -1)
    return torch.cat([accept_nodes, pad], dim=1)


def _check_max_depth(parents, max_depth):
    if max_depth is None:
        return
    if not isinstance(max_depth, int) or max_depth < 0:
        raise ValueError(f"max_depth must be a non-negative int, got {max_depth!r}")
    if checks.value_checks_enabled():
        depth = int(reference.tree_depths(parents.cpu()).max())
        if max_depth < depth:
            raise ValueError(f"max_depth={max_depth} is smaller than the trees' depth {depth}")


def verify_tree_greedy(draft_tokens, parents, target_argmax, *, max_depth: int | None = None):
    """Greedy tree verification: the longest path of drafts the verifier's argmax agrees with.

    Parameters
    ----------
    draft_tokens : [B, N] int32 / int64, node 0 the root (its token is not tested).
    parents : [B, N] int32 / int64, a tree per row (see build_tree).
    target_argmax : [B, N] int32 / int64, the verifier's argmax after each node.
    max_depth : int, optional: the output width (default the trees' depth, which reads them: a host sync on CUDA).

    Returns
    -------
    accept_nodes : [B, max_depth + 1] int64, root first, -1 padded; accept_len : [B] int64, accepted nodes with
    the root (= tokens the step emits); bonus_token : [B] int64, target_argmax at the last accepted node.
    Node i > 0 is accepted iff its parent is and draft_tokens[i] == target_argmax[parent(i)]; the deepest accepted
    node wins (ties: the lowest index).

    Example
    -------
    >>> parents = torch.tensor([[-1, 0, 0, 2]])
    >>> draft, argmax = torch.tensor([[5, 7, 8, 9]]), torch.tensor([[8, 1, 9, 4]])
    >>> [t.tolist() for t in verify_tree_greedy(draft, parents, argmax)]
    [[[0, 2, 3]], [3], [4]]
    """
    checks.tree_parents(parents)
    batch, n = parents.shape
    checks.token_ids("draft_tokens", draft_tokens, batch, n)
    checks.token_ids("target_argmax", target_argmax, batch, n)
    checks.same_device(draft_tokens=draft_tokens, parents=parents, target_argmax=target_argmax)
    _check_max_depth(parents, max_depth)
    backend = resolve_backend("verify_tree_greedy", parents.device, has_cpp=True, triton_ok=_tree_limit(n))
    if backend == "triton":
        out = _kernels("verify_tree_greedy").verify_tree_greedy(
            _row_contiguous(draft_tokens), _row_contiguous(parents), _row_contiguous(target_argmax),
            max_depth=min(max_depth, n - 1) if max_depth is not None else None)
    elif backend == "cpp":
        out = _ext.cpp_op("verify_tree_greedy")(draft_tokens, parents, target_argmax)
    else:
        out = reference.verify_tree_greedy(draft_tokens, parents, target_argmax)
    accept_nodes, accept_len, bonus = out
    return _fit_width(accept_nodes, max_depth), accept_len, bonus


def verify_tree_sampling(draft_tokens, parents, target_probs, uniform=None, *, generator=None,
                         max_depth: int | None = None):
    """Lossless speculative sampling over a tree of deterministic (e.g. top-k) drafts.

    Parameters
    ----------
    draft_tokens, parents : [B, N] int32 / int64, as in verify_tree_greedy.
    target_probs : [B, N, V] float32 / float16 / bfloat16, the verifier's next-token distribution after each node
        (tempered / truncated as wanted; need not sum to 1).
    uniform : [B, N] float in [0, 1), optional: node i's test uses uniform[b, i], the bonus draw uniform[b, 0];
        drawn with `generator` when None.
    max_depth : int, optional, as in verify_tree_greedy.

    Returns
    -------
    (accept_nodes [B, max_depth + 1] int64, accept_len [B] int64, bonus_token [B] int64). From the root, children
    are tried in index order: child token x is accepted with probability w[x] / sum(w), w being target_probs at the
    current node with the tokens already rejected there zeroed; on rejection w[x] = 0. The bonus token is drawn
    from the final w (token 0 if nothing in it is positive). Emitted tokens are distributed as the verifier's own.

    Example
    -------
    >>> probs = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # one-hot: it reduces to greedy
    >>> [t.tolist() for t in verify_tree_sampling(torch.tensor([[0, 1]]), torch.tensor([[-1, 0]]), probs)]
    [[[0, 1]], [2], [2]]
    """
    checks.tree_parents(parents)
    batch, n = parents.shape
    checks.probabilities("target_probs", target_probs, batch, n)
    checks.token_ids("draft_tokens", draft_tokens, batch, n, vocab=target_probs.shape[-1])
    if uniform is None:
        uniform = torch.rand(batch, n, generator=generator, device=parents.device)
    checks.tensor("uniform", uniform, ndim=2, dtypes=checks.FLOAT_DTYPES)
    checks.shape("uniform", uniform, (batch, n), "one uniform draw per tree node")
    checks.same_device(draft_tokens=draft_tokens, parents=parents, target_probs=target_probs, uniform=uniform)
    if checks.value_checks_enabled() and bool(((uniform < 0) | (uniform >= 1)).any()):
        raise ValueError("uniform must hold values in [0, 1)")
    _check_max_depth(parents, max_depth)
    backend = resolve_backend("verify_tree_sampling", parents.device, has_cpp=True, triton_ok=_tree_limit(n))
    if backend == "triton":
        out = _kernels("verify_tree_sampling").verify_tree_sampling(
            _row_contiguous(draft_tokens), _row_contiguous(parents), target_probs, _row_contiguous(uniform),
            max_depth=min(max_depth, n - 1) if max_depth is not None else None)
    elif backend == "cpp":
        out = _ext.cpp_op("verify_tree_sampling")(draft_tokens, parents, target_probs, uniform)
    else:
        out = reference.verify_tree_sampling(draft_tokens, parents, target_probs, uniform)
    accept_nodes, accept_len, bonus = out
    return _fit_width(accept_nodes, max_depth), accept_len, bonus


def _cache_list(caches) -> list[torch.Tensor]:
    """Every K/V tensor of `caches`: a tensor, a sequence of tensors or (k, v) pairs, or a transformers cache
    (duck-typed: `.layers[i].keys / .values` as in transformers 5, or `.key_cache / .value_cache` lists)."""
    if isinstance(caches, torch.Tensor):
        return [caches]
    layers = getattr(caches, "layers", None)
    if layers is not None and all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        caches = [(layer.keys, layer.values) for layer in layers]
    elif hasattr(caches, "key_cache") and hasattr(caches, "value_cache"):
        caches = list(zip(caches.key_cache, caches.value_cache))
    if not isinstance(caches, (list, tuple)) or not caches:
        raise ValueError("caches must be a tensor [..., B, H, S, Dh], a non-empty sequence of them (or of (k, v) "
                         f"pairs), or a transformers cache; got {type(caches).__name__}")
    flat = []
    for item in caches:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return flat


def _stacked_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One [C, B, H, S, Dh] view over all cache tensors: a single tensor's leading dims flattened, or
    per-layer [B, H, S, Dh] tensors that are equally spaced views of one buffer (a preallocated cache)."""
    first = tensors[0]
    if len(tensors) == 1:
        try:
            return first.view(-1, *first.shape[-4:])
        except RuntimeError:
            return None
    if first.dim() != 4:
        return None
    gap = tensors[1].data_ptr() - first.data_ptr()
    if gap <= 0 or gap % first.element_size():
        return None
    storage = first.untyped_storage().data_ptr()
    for i, t in enumerate(tensors):
        if (t.untyped_storage().data_ptr() != storage or t.stride() != first.stride()
                or t.data_ptr() - first.data_ptr() != i * gap):
            return None
    return torch.as_strided(first, (len(tensors), *first.shape), (gap // first.element_size(), *first.stride()),
                            first.storage_offset())


def kv_compact(caches, accept_nodes, prefix_len):
    """Keep the accepted tree slots: move them to [prefix_len, prefix_len + accept_len), in place.

    Parameters
    ----------
    caches : a tensor [..., B, H, S, Dh] (leading dims: layers, K/V), a sequence of such tensors or (k, v) pairs,
        or a transformers cache object. Tree node i sits at slot prefix_len + i.
    accept_nodes : [B, M] int32 / int64, root first, strictly increasing, -1 padded (as verify_tree_* give it).
    prefix_len : [B] int32 / int64 or an int.

    Returns
    -------
    new_len : [B] int64 = prefix_len + accept_len. One launch on CUDA for one tensor or equally spaced views of
    one buffer (the static cache's layout), one per tensor otherwise.

    Example
    -------
    >>> cache = torch.arange(6.0).view(1, 1, 6, 1)  # [B, H, S, Dh]: slot s holds s
    >>> kv_compact(cache, torch.tensor([[0, 2]]), 3).tolist(), cache.flatten().tolist()
    ([5], [0.0, 1.0, 2.0, 3.0, 5.0, 5.0])
    """
    tensors = _cache_list(caches)
    for i, t in enumerate(tensors):
        checks.tensor(f"caches[{i}]", t, min_ndim=4)
        if t.shape != tensors[0].shape or t.dtype != tensors[0].dtype or t.device != tensors[0].device:
            raise ValueError(f"caches[{i}] has shape {tuple(t.shape)} / {t.dtype} / {t.device}, expected the "
                             f"shape, dtype and device of caches[0] {tuple(tensors[0].shape)} / "
                             f"{tensors[0].dtype} / {tensors[0].device}")
    batch, _, slots, _ = tensors[0].shape[-4:]
    device = tensors[0].device
    checks.accept_path(accept_nodes, batch)
    checks.same_device(caches=tensors[0], accept_nodes=accept_nodes)
    prefix_len = checks.prefix_lengths(prefix_len, batch, device)
    if checks.value_checks_enabled() and accept_nodes.numel():
        furthest = int((prefix_len + accept_nodes.max(-1).values).max())
        if furthest >= slots:
            raise ValueError(f"accept_nodes reach cache slot {furthest}, but the caches hold {slots} slots")
    backend = resolve_backend("kv_compact", device, has_cpp=True)
    if backend == "triton":
        kernel = _kernels("kv_compact").kv_compact
        accept_nodes, prefix_len = _row_contiguous(accept_nodes), prefix_len.contiguous()
        stacked = _stacked_view(tensors)
        if stacked is not None:
            return kernel(stacked, accept_nodes, prefix_len)
        for tensor in tensors:
            view = tensor.reshape(-1, *tensor.shape[-4:])
            new_len = kernel(view, accept_nodes, prefix_len)
            if view.data_ptr() != tensor.data_ptr():  # reshape had to copy a non-viewable layout
                tensor.copy_(view.view(tensor.shape))
        return new_len
    if backend == "cpp":
        return _kv_compact_cpp(tensors, accept_nodes, prefix_len)
    return reference.kv_compact(tensors, accept_nodes, prefix_len)


def _kv_compact_cpp(tensors: list[torch.Tensor], accept_nodes, prefix_len) -> torch.Tensor:
    """C++ moves on [C, B, H, S, Dh] views with contiguous rows; other layouts move with ATen index ops."""
    stacked = _stacked_view(tensors)
    views = [stacked] if stacked is not None else [t.reshape(-1, *t.shape[-4:]) for t in tensors]
    for view, tensor in zip(views, [None] * len(views) if stacked is not None else tensors):
        if view.stride(-1) == 1:
            new_len = _ext.cpp_op("kv_compact_")(view, accept_nodes, prefix_len)
        else:
            src, dst, new_len = _ext.cpp_op("kv_compact_indices")(accept_nodes, prefix_len)
            _move_slots(view, src, dst)
        if tensor is not None and view.data_ptr() != tensor.data_ptr():  # reshape had to copy
            tensor.copy_(view.view(tensor.shape))
    return new_len


def _move_slots(cache: torch.Tensor, src, dst):
    """cache[:, b, :, dst[b]] = cache[:, b, :, src[b]] row by row (gather before scatter: ranges overlap)."""
    for b in range(src.shape[0]):
        keep = src[b] >= 0
        rows = cache[:, b].index_select(-2, src[b][keep])
        cache[:, b].index_copy_(-2, dst[b][keep], rows)


def tree_attention(q, keys, values, starts, lengths, block, offset, scale: float | None = None):
    """Attention of tree (or decode) queries over a static KV cache, reading only the slots each row uses.

    Parameters
    ----------
    q : [B, H, T, Dh] float32 / float16 / bfloat16, the queries (already rotated).
    keys, values : [B, H_kv, S, Dh] in q's dtype, the cache (S: its capacity); H a multiple of H_kv (query head h
        reads KV head h // (H / H_kv)).
    starts, lengths : [B] int64: row b's committed slots are [starts[b], lengths[b]).
    block : [B or 1, T, W] bool: query t sees slot offset[b] + j iff block[b, t, j]; inside those W slots the
        block decides, outside them the committed range does.
    offset : [B] int64. scale : float, default Dh ** -0.5.

    Returns
    -------
    out : [B, H, T, Dh] in q's dtype. Every query must see at least one slot. On CUDA one split-K Triton launch plus
    a merge: it never reads slots outside [min(start, offset), max(length, offset + W)), so its cost follows the
    committed length, not S. Elsewhere the reference (a dense mask).

    Example
    -------
    >>> q = torch.ones(1, 1, 1, 2); keys = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]]])
    >>> values = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]]])
    >>> one = torch.tensor([0]); two = torch.tensor([2]); sees_itself = torch.ones(1, 1, 1, dtype=torch.bool)
    >>> tree_attention(q, keys, values, one, one, sees_itself, one, scale=1.0).tolist()  # slot 0 only
    [[[[1.0, 0.0]]]]
    >>> tree_attention(q, keys, values, one, two, sees_itself, one, scale=1.0).tolist()  # slots 0, 1 (not 2)
    [[[[0.5, 0.5]]]]
    """
    checks.tensor("q", q, ndim=4, dtypes=checks.FLOAT_DTYPES)
    batch, heads, tokens, head_dim = q.shape
    checks.tensor("keys", keys, ndim=4, dtypes=(q.dtype,))
    checks.tensor("values", values, ndim=4, dtypes=(q.dtype,))
    if keys.shape != values.shape or keys.shape[0] != batch or keys.shape[3] != head_dim:
        raise ValueError(f"keys / values must be [B={batch}, H_kv, S, Dh={head_dim}] alike, got {tuple(keys.shape)} "
                         f"and {tuple(values.shape)}")
    if heads % keys.shape[1]:
        raise ValueError(f"q's {heads} heads are not a multiple of the cache's {keys.shape[1]} KV heads")
    for name, tensor in (("starts", starts), ("lengths", lengths), ("offset", offset)):
        checks.tensor(name, tensor, ndim=1, dtypes=(torch.int64,))
        checks.shape(name, tensor, (batch,), "one per row")
    checks.tensor("block", block, ndim=3, dtypes=(torch.bool,))
    if block.shape[0] not in (1, batch) or block.shape[1] != tokens:
        raise ValueError(f"block must be [B or 1, T={tokens}, W], got {tuple(block.shape)}")
    checks.same_device(q=q, keys=keys, values=values, starts=starts, lengths=lengths, block=block, offset=offset)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    rows = heads // keys.shape[1] * tokens
    fits = None if rows <= MAX_ATTENTION_ROWS else f"{rows} query rows per KV head exceed the kernel's tile"
    backend = resolve_backend("tree_attention", q.device, has_cpp=False, triton_ok=fits)
    if backend == "triton":
        return _kernels("tree_attention").tree_attention(q, keys, values, starts.contiguous(), lengths.contiguous(),
                                                         block, offset.contiguous(), scale)
    return reference.tree_attention(q, keys, values, starts, lengths, block, offset, scale)
