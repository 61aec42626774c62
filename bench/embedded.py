"""The embedded model as the before / after benchmarks load it: SmolLM2-135M-Instruct (fp32) from the demo cache,
a named adapter from that cache (or an untrained one of the same shape, labelled), and held-out demo prompts."""
from __future__ import annotations

import os

import torch


def load_embedded(adapter_name: str, prompt_count: int, seed_untrained: bool = False):
    """(model, tokenizer, adapter, prompts [list of [1, P] ids], note). The note says whether the adapter was trained:
    an untrained one makes acceptance meaningless, while a step's cost is the same."""
    from sdalign_rt.adapter import WEIGHTS_NAME, BottleneckAdapter
    from sdalign_rt.demo import experiment, prompts as demo_prompts, smollm2

    cache = smollm2.default_cache_dir()
    model, tokenizer = experiment.load_model(smollm2.checkpoint(cache), "float32")
    folder = os.path.join(cache, adapter_name)
    if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        adapter, note = BottleneckAdapter.from_pretrained(folder), f"trained adapter {adapter_name}"
    else:
        if seed_untrained:
            torch.manual_seed(0)
        adapter = BottleneckAdapter(model.config.hidden_size, 256, input_norm=True)
        note = f"UNTRAINED adapter ({adapter_name} not in the demo cache): acceptance is meaningless, step costs are not"
    prompts = [experiment.chat_ids(tokenizer, p) for p in demo_prompts.eval_prompts()[:prompt_count]]
    return model, tokenizer, adapter, prompts, note
