"""Export a trained drafter (a Llama-family verifier's first k layers + a BottleneckAdapter) as a checkpoint
folder vLLM loads through `speculative_config={"method": "eagle", "model": <folder>, ...}`.

What the folder holds, and why:
  config.json        the verifier's config with `architectures` set to the plugin's class and num_hidden_layers = k,
                     plus an `sdalign_rt` block (draft layers, bottleneck, context, draft vocabulary size);
  model.safetensors  copies of the verifier's first k decoder layers (HF names `model.layers.{i}.*`: vLLM's EAGLE
                     draft class never sees the target's modules, and the draft layers keep their own KV cache
                     there anyway), and the adapter as `adapter.{norm, down.*, up.*, context.weight, draft_vocab}`.
The embeddings and the LM head are not copied: the class declares it has none of its own, so vLLM shares the
target's.

Needs only torch, safetensors and the two folders (no vLLM), so a checkpoint can be made on any machine.
"""
from __future__ import annotations

import json
import os

import torch

from sdalign_rt.vllm_plugin import ARCHITECTURE

WEIGHTS_NAME = "model.safetensors"
# Decoder families whose first layers vLLM's LlamaDecoderLayer runs unchanged (no qkv bias, no sliding window).
SUPPORTED_MODEL_TYPES = ("llama",)


def _target_config(target_dir: str) -> dict:
    path = os.path.join(target_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the verifier folder {target_dir!r} has no config.json")
    with open(path) as f:
        return json.load(f)


def _weight_files(target_dir: str) -> dict:
    """{tensor name: file} over the verifier's safetensors (one file or an index of shards)."""
    index = os.path.join(target_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            mapping = json.load(f)["weight_map"]
        return {name: os.path.join(target_dir, file) for name, file in mapping.items()}
    single = os.path.join(target_dir, WEIGHTS_NAME)
    if not os.path.isfile(single):
        raise FileNotFoundError(f"the verifier folder {target_dir!r} has neither {WEIGHTS_NAME} nor "
                                "model.safetensors.index.json (export reads safetensors checkpoints only)")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}


def _first_layers(target_dir: str, k: int) -> dict:
    from safetensors import safe_open

    files = _weight_files(target_dir)
    wanted = {name: file for name, file in files.items()
              if name.startswith("model.layers.") and int(name.split(".")[2]) < k}
    missing = [i for i in range(k) if not any(n.startswith(f"model.layers.{i}.") for n in wanted)]
    if missing:
        raise ValueError(f"the verifier checkpoint in {target_dir!r} has no weights for decoder layer(s) {missing} "
                         "under model.layers.* (a Llama-family causal LM is expected)")
    out = {}
    for file in sorted(set(wanted.values())):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                if name in wanted and wanted[name] == file:
                    out[name] = f.get_tensor(name)
    return out


def _check_out_dir(out_dir: str) -> None:
    """Write into a new or empty folder, or over a previous export: never beside other files (vLLM would read
    a stale shard index or weights as part of the drafter)."""
    if not os.path.isdir(out_dir):
        return
    others = sorted(set(os.listdir(out_dir)) - {"config.json", WEIGHTS_NAME})
    if others:
        raise ValueError(f"the output folder {out_dir!r} holds other files ({', '.join(others[:5])}): export into "
                         "a new or empty folder")


def drafter_config(target: dict, adapter_config: dict, draft_layers: int, dtype: str | None = None) -> dict:
    """The draft folder's config.json: the verifier's, cut to k layers, naming the plugin's architecture."""
    model_type = target.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"vLLM export supports verifiers of model_type {SUPPORTED_MODEL_TYPES}, got {model_type!r} "
                         "(its first layers must run as vLLM's LlamaDecoderLayer)")
    layers = target.get("num_hidden_layers")
    if not isinstance(layers, int) or "hidden_size" not in target:
        raise ValueError("the verifier's config.json has no num_hidden_layers / hidden_size (a Llama-family "
                         "causal LM config is expected)")
    if not isinstance(draft_layers, int) or isinstance(draft_layers, bool) or not 1 <= draft_layers <= layers:
        raise ValueError(f"draft_layers must be an int in [1, {layers}] (the verifier's decoder layers), "
                         f"got {draft_layers!r}")
    hidden = target["hidden_size"]
    if adapter_config["hidden_size"] != hidden or adapter_config.get("out_size", hidden) != hidden:
        raise ValueError(f"the adapter maps {adapter_config['hidden_size']} -> {adapter_config.get('out_size')}, "
                         f"but the verifier's hidden size is {hidden} (a self-drafting adapter maps D -> D)")
    context = adapter_config.get("context_size")
    if context is not None and context != hidden:
        raise ValueError(f"the adapter's context size is {context}, but vLLM hands it the verifier's final state "
                         f"of size {hidden}")
    config = dict(target)
    config["architectures"] = [ARCHITECTURE]
    config["num_hidden_layers"] = draft_layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:draft_layers]
    if dtype is not None:
        config["torch_dtype"] = config["dtype"] = dtype
    config["sdalign_rt"] = {
        "draft_layers": draft_layers,
        "target_num_hidden_layers": layers,
        "bottleneck": adapter_config["bottleneck"],
        "input_norm": bool(adapter_config.get("input_norm", False)),
        "norm_eps": adapter_config.get("norm_eps", 1e-5),
        "context_size": context,
        "draft_vocab_size": adapter_config.get("draft_vocab_size"),
    }
    return config


def export_drafter(target_dir: str, adapter_dir: str, draft_layers: int, out_dir: str,
                   dtype: str | None = None) -> str:
    """Write the vLLM draft checkpoint for (verifier in `target_dir`, its first `draft_layers` layers, the adapter
    in `adapter_dir`) to `out_dir`; returns out_dir. dtype ("float32", "bfloat16", ...) casts the floating weights
    (default: as stored)."""
    from safetensors.torch import save_file

    from sdalign_rt.adapter import BottleneckAdapter

    cast = None
    if dtype is not None:
        cast = getattr(torch, dtype, None) if isinstance(dtype, str) else None
        if not isinstance(cast, torch.dtype) or not cast.is_floating_point:
            raise ValueError(f"dtype must name a floating torch dtype (float32, bfloat16, float16), got {dtype!r}")
    target = _target_config(target_dir)
    adapter = BottleneckAdapter.from_pretrained(adapter_dir)
    config = drafter_config(target, adapter.config(), draft_layers, dtype)

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().contiguous().cpu()
        return tensor.to(cast) if cast is not None and tensor.is_floating_point() else tensor

    weights = {name: convert(t) for name, t in _first_layers(target_dir, draft_layers).items()}
    for name, tensor in adapter.state_dict().items():
        weights[f"adapter.{name}"] = convert(tensor)
    _check_out_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(weights, os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    return out_dir
