"""The adapter-aligned shallow drafter as a speculative method of vLLM (optional: `pip install sdalign_rt[vllm]`).

vLLM's EAGLE path already hosts a drafter of our shape: per drafted token it hands the draft model the new token
and the target's final (post-norm) hidden state at the previous position, runs the draft model's own attention
layers on their own KV cache, scores its returned state with the target's LM head, and feeds that returned state
back as the next depth's hidden state. Our drafter reads exactly those inputs: the first k decoder layers on the
token, the BottleneckAdapter with the target's previous state as context, the target's LM head over the adapter's
draft vocabulary. So no fork and no new proposer: an out-of-tree model class (`draft_model.py`) registered under
an architecture name vLLM's EAGLE config keeps as is (names starting with "Eagle"), and a checkpoint folder
(`export.py`: `sdalign-rt export-vllm-drafter`) that names it.

The entry point `vllm.general_plugins: sdalign_rt_drafter = sdalign_rt.vllm_plugin:register` makes every vLLM
process (engine core, workers) register the class; calling `register()` yourself does the same in-process.
"""
from __future__ import annotations

ARCHITECTURE = "EagleBottleneckLlamaForCausalLM"
MODEL_CLASS = "sdalign_rt.vllm_plugin.draft_model:EagleBottleneckLlamaForCausalLM"


def register() -> None:
    """Register the draft architecture with vLLM's model registry (idempotent; vLLM calls it in each process)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # A lazy "module:Class" string: vLLM imports it only where a model of this architecture is built.
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
