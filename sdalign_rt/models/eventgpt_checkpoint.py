"""Loading EventGPT checkpoints as published (the authors' model/EventChatModel.py and inference scripts).

Weight layouts, told apart by the names in the checkpoint:
- "nested": the public module tree, model.visual_tower.visual_tower.* (`VisualTower` wraps the CLIPVisionModel),
  with CLIP's transformers-4 `vision_model.` level or without it (transformers 5 drops it; both load);
- "flat": model.visual_tower.* straight onto the CLIP model (this package's earlier checkpoints), renamed on load;
- "none": no tower weights. The public model builds its tower at load time from config.mm_visual_tower
  (`CLIPVisionModel.from_pretrained`), so tower weights, architecture and image processor come from that folder.

mm_visual_tower is found as the public scripts find it: a local folder as is, else the name (or the last part of
a hub name such as "openai/clip-vit-large-patch14-336") inside the checkpoint folder, next to it (their
`checkpoints/` folder) or in a folder the caller gives (`clip_dir`, which may also be the tower folder itself).
The folder is required when the config has no `vision_config` (public configs have none) or the layout is "none";
otherwise it is optional and the checkpoint's own preprocessor_config.json serves as the event processor.

Every tower / projector / feature-adaptor / LM weight must come from the checkpoint (or, for "none", the tower
folder): transformers would leave a missing one at its random initialisation with only a warning, here it is an
error naming the weights. Then the public loader's tokens are added and the embeddings resized to the tokenizer.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sdalign_rt.models.eventgpt import EventGPTConfig, EventGPTForCausalLM
from sdalign_rt.models.eventgpt_prompt import load_eventgpt_tokenizer

logger = logging.getLogger(__name__)

TOWER = "model.visual_tower."
NESTED_TOWER = "model.visual_tower.visual_tower."
# flat names onto the nested module (CLIP's own `vision_model.` prefix, if any, is CLIP's conversion to drop)
FLAT_TO_NESTED = {r"^model\.visual_tower\.(?!visual_tower\.)": NESTED_TOWER}
DEFAULT_TOWER = "openai/clip-vit-large-patch14-336"


@dataclass
class EventGPTCheckpoint:
    model: EventGPTForCausalLM
    tokenizer: object  # SlowLlamaTokenizer, with the config's event tokens added
    event_processor: object  # CLIPImageProcessor
    layout: str  # "nested", "flat" or "none"
    tower_dir: str | None  # the resolved mm_visual_tower folder, None when not found and not needed
    added_tokens: list  # tokens the loader added to the tokenizer (new embedding rows when beyond the checkpoint's)


def checkpoint_weight_names(directory: str) -> set[str]:
    """Weight names of a transformers checkpoint: safetensors or .bin, one file or sharded with an index."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = os.path.join(directory, index)
        if os.path.isfile(path):
            with open(path) as f:
                return set(json.load(f)["weight_map"])
    path = os.path.join(directory, "model.safetensors")
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return set(f.keys())
    path = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(path):
        return set(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
    raise FileNotFoundError(f"EventGPT checkpoint {directory!r} holds no weights (model.safetensors, "
                            "pytorch_model.bin or a sharded index)")


def weight_layout(names) -> str:
    if any(n.startswith(NESTED_TOWER) for n in names):
        return "nested"
    return "flat" if any(n.startswith(TOWER) for n in names) else "none"


def _is_clip_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def tower_candidates(name: str | None, checkpoint_dir: str, clip_dir: str | None = None) -> list[str]:
    """Where mm_visual_tower may be, in the order tried."""
    candidates = [clip_dir] if clip_dir else []
    if name:
        name = os.path.expanduser(name)
        candidates.append(name)
        if not os.path.isabs(name):
            bases = [checkpoint_dir, os.path.dirname(os.path.abspath(checkpoint_dir))]
            bases += [clip_dir] if clip_dir else []
            for base in bases:
                candidates += [os.path.join(base, name), os.path.join(base, os.path.basename(name.rstrip("/")))]
    return list(dict.fromkeys(candidates))


def resolve_visual_tower(name: str | None, checkpoint_dir: str, clip_dir: str | None = None) -> str | None:
    """The local CLIP folder mm_visual_tower names (see the module docstring), or None."""
    candidates = tower_candidates(name, checkpoint_dir, clip_dir)
    return next((c for c in candidates if os.path.isdir(c) and _is_clip_folder(c)), None)


def _tower_not_found(name, checkpoint_dir, clip_dir, why: str) -> FileNotFoundError:
    if not name or os.path.basename(name.rstrip("/")) == os.path.basename(DEFAULT_TOWER):
        repo = DEFAULT_TOWER  # the released EventGPT-7b's tower, however its config spells it
    else:
        repo = name
    folder = os.path.join(os.path.dirname(os.path.abspath(checkpoint_dir)), os.path.basename(repo))
    looked = ", ".join(tower_candidates(name, checkpoint_dir, clip_dir)) or "nowhere (no mm_visual_tower)"
    return FileNotFoundError(
        f"EventGPT checkpoint {checkpoint_dir!r} {why}, so it needs the CLIP vision tower its config names "
        f"(mm_visual_tower={name!r}), which is not a local CLIP folder (looked in: {looked}). Download {repo} "
        f"(e.g. `huggingface-cli download {repo} --local-dir {folder}`) or give its folder as clip_dir / --clip-dir.")


@contextmanager
def _quiet_transformers():
    """transformers' load report would call tower weights that are loaded next "newly initialized"; the checks
    here replace it."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _group(names, label: str | None = None) -> str:
    """"projector weights model.visual_projector.0.weight, ..." for an error message."""
    parts = {"visual_tower": "CLIP tower", "visual_projector": "projector", "feature_adaptor": "feature adaptor"}
    groups = [label] if label else sorted(
        {next((name for key, name in parts.items() if f".{key}." in f".{n}"), "language model") for n in names})
    shown = ", ".join(sorted(names)[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
    return f"{' / '.join(groups)} weights {shown}"


def _load_tower(tower_dir: str, dtype) -> torch.nn.Module:
    from transformers import CLIPVisionModel

    with _quiet_transformers():
        tower, info = CLIPVisionModel.from_pretrained(tower_dir, dtype=dtype, output_loading_info=True)
    if info["missing_keys"]:
        missing = _group(set(info["missing_keys"]), "CLIP tower")
        raise ValueError(f"CLIP tower folder {tower_dir!r} lacks {missing}; they would stay randomly initialised")
    return tower.eval()


def fit_embeddings_to_tokenizer(model, size: int) -> None:
    """Resize input and output embeddings to `size` rows as the public loader does; rows it adds get the mean of
    the trained rows (deterministic; the public code leaves transformers' random init there)."""
    old = model.get_input_embeddings().weight.shape[0]
    if size == old:
        return
    model.resize_token_embeddings(size, mean_resizing=False)
    if size > old:
        with torch.no_grad():
            for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
                layer.weight[old:] = layer.weight[:old].float().mean(0).to(layer.weight.dtype)
    model.config.vocab_size = size


def event_image_processor(checkpoint_dir: str, tower_dir: str | None):
    """The tower folder's CLIPImageProcessor (the public `VisualTower.event_processor`), else the checkpoint's."""
    from transformers import CLIPImageProcessor

    for folder in (tower_dir, checkpoint_dir):
        if folder and os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
            return CLIPImageProcessor.from_pretrained(folder)
    raise FileNotFoundError(f"no event image processor: neither the CLIP tower folder ({tower_dir!r}) nor the "
                            f"EventGPT checkpoint {checkpoint_dir!r} holds preprocessor_config.json")


def load_eventgpt(directory: str, *, clip_dir: str | None = None, dtype: torch.dtype = torch.float16,
                  **options) -> EventGPTCheckpoint:
    """Load an EventGPT checkpoint in any of the layouts above, with its tokenizer and event image processor.

    options go to from_pretrained (quantization_config, device_map, ...). Raises FileNotFoundError naming what to
    download when the CLIP tower is needed and not found, ValueError naming weights nothing provides.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"drafter checkpoint directory {directory!r} does not exist")
    config_path, model_type = os.path.join(directory, "config.json"), None
    if os.path.isfile(config_path):
        with open(config_path) as f:
            model_type = json.load(f).get("model_type")
    if model_type != EventGPTConfig.model_type:
        raise ValueError(f"{directory!r} is not an EventGPT checkpoint: its config.json has model_type "
                         f"{model_type!r}, not {EventGPTConfig.model_type!r}")
    config = EventGPTConfig.from_pretrained(directory)
    names = checkpoint_weight_names(directory)
    layout = weight_layout(names)
    tower_dir = resolve_visual_tower(config.mm_visual_tower, directory, clip_dir)
    if tower_dir is None and (layout == "none" or config.vision_config is None):
        why = "holds no CLIP tower weights" if layout == "none" else "has no vision_config"
        raise _tower_not_found(config.mm_visual_tower, directory, clip_dir, why)
    if config.vision_config is None or layout == "none":  # the tower folder decides the tower's shape
        from transformers import CLIPVisionConfig

        config.vision_config = CLIPVisionConfig.from_pretrained(tower_dir).to_dict()
    # the small files first: a bad tokenizer or processor fails before 7B of weights are read
    tokenizer, added = load_eventgpt_tokenizer(directory, config)
    processor = event_image_processor(directory, tower_dir)
    if layout == "flat":
        options["key_mapping"] = FLAT_TO_NESTED
    with _quiet_transformers():
        model, info = EventGPTForCausalLM.from_pretrained(directory, config=config, dtype=dtype,
                                                          output_loading_info=True, **options)
    missing = set(info["missing_keys"])
    if layout == "none":
        missing = {n for n in missing if not n.startswith(NESTED_TOWER)}
    if missing:
        raise ValueError(f"EventGPT checkpoint {directory!r} lacks {_group(missing)}; they would stay randomly "
                         "initialised")
    if info["unexpected_keys"]:
        logger.warning("EventGPT checkpoint %s holds weights the model does not use: %s", directory,
                       ", ".join(sorted(info["unexpected_keys"])[:6]))
    if layout == "none":
        old = model.model.visual_tower.visual_tower
        device = next(old.parameters()).device
        model.model.visual_tower.visual_tower = _load_tower(tower_dir, dtype).to(device)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        new = sorted((i, t) for t, i in tokenizer.get_vocab().items() if i >= rows)
        logger.warning("EventGPT tokenizer has %d tokens, the checkpoint %d embedding rows: the rows of %s start as "
                       "the mean row (not trained)", len(tokenizer), rows, ", ".join(t for _, t in new))
    fit_embeddings_to_tokenizer(model, len(tokenizer))
    return EventGPTCheckpoint(model.eval(), tokenizer, processor, layout, tower_dir, added)
