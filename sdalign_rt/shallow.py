"""Shallow (early-exit) drafting: a view of a model's first k decoder layers that shares every weight.

The view is the model's decoder stack (`get_decoder()`: LlamaModel for LlamaForCausalLM, the language model
inside Llava / Video-LLaVA) with its layer list cut to k and its final norm replaced by the identity, so its
last hidden state is the raw output of layer k, i.e. the full model's output_hidden_states[k]. Nothing is
copied: the view holds the same parameter tensors, and a cache built from its config holds k layers.
"""
from __future__ import annotations

import copy

from torch import nn


# Where decoder stacks keep their block list and final norm: LLaMA-family (layers, norm), GPT-NeoX
# (layers, final_layer_norm), GPT-2 / GPT-J (h, ln_f), Falcon (h, ln_f), Phi-1/2 (layers, final_layernorm), MPT (blocks, norm_f).
_LAYER_LISTS = ("layers", "h", "blocks", "block")
_FINAL_NORMS = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "norm_f")


def _attribute(decoder, names, kind: str) -> str:
    for name in names:
        if isinstance(getattr(decoder, name, None), nn.Module):
            return name
    raise ValueError(f"shallow drafting cannot find the {kind} of {type(decoder).__name__} (looked for "
                     f"{', '.join(names)})")


def decoder_layers(model) -> nn.ModuleList:
    decoder = model.get_decoder()
    return getattr(decoder, _attribute(decoder, _LAYER_LISTS, "decoder layer list"))


def final_norm(model) -> nn.Module:
    """The norm the model applies to its last layer's output before the LM head."""
    decoder = model.get_decoder()
    return getattr(decoder, _attribute(decoder, _FINAL_NORMS, "final norm"))


def num_decoder_layers(model) -> int:
    return len(decoder_layers(model))


def check_draft_layers(model, k) -> None:
    total = num_decoder_layers(model)
    if not isinstance(k, int) or not 1 <= k <= total:
        raise ValueError(f"draft_layers must be an int in [1, {total}] (the drafter's decoder layers), got {k!r}")


def shallow_view(model, k: int):
    """The first k decoder layers of `model` as a module returning raw layer-k hidden states."""
    check_draft_layers(model, k)
    return shallow_view_of_decoder(model.get_decoder(), k)


def shallow_view_of_decoder(decoder, k: int):
    """The first k layers of a decoder stack (final norm replaced by the identity), sharing its weights."""
    _install_output_hooks(decoder)
    layers, norm = _attribute(decoder, _LAYER_LISTS, "decoder layer list"), _attribute(decoder, _FINAL_NORMS, "final norm")
    view = copy.copy(decoder)
    view._modules = dict(decoder._modules)  # a copy.copy shares this dict: give the view its own
    setattr(view, layers, nn.ModuleList(list(getattr(decoder, layers))[:k]))
    setattr(view, norm, nn.Identity())
    view.config = copy.copy(decoder.config)
    view.config.num_hidden_layers = k
    if getattr(view.config, "layer_types", None) is not None:
        view.config.layer_types = list(view.config.layer_types)[:k]
    return view


def _install_output_hooks(decoder) -> None:
    """transformers >= 5 records output_hidden_states with forward hooks on the layers, installed once per model
    object on its first such call. A view made before that would install a second set on the layers it shares,
    and the full model would then record those layers twice (hidden_states[k] silently shifts). Install the
    model's hooks first: the view copies its "installed" flag and never adds its own."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # transformers 4.x returns hidden states without hooks
        return
    maybe_install_capturing_hooks(decoder)


class _Captured(Exception):
    """Carries the first decoder layer's input out of a forward that need not go further."""


def merged_input_embeddings(model, input_ids, **model_inputs):
    """The hidden states `model`'s first decoder layer receives for this prompt: token embeddings with media
    (event features, image or video features) merged in by the model's own code. The forward stops there,
    so only the embedding and vision path runs; a shallow drafting view is then prefilled from these."""
    def stop(module, args, kwargs):
        raise _Captured(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    handle = decoder_layers(model)[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False, **model_inputs)
    except _Captured as captured:
        return captured.args[0]
    finally:
        handle.remove()
    raise RuntimeError("the model's forward never reached its first decoder layer")
