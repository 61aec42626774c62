"""The real pair's model-side code: EventGPT (drafter) and Video-LLaVA (verifier) inputs and loaders."""
from sdalign_rt.models.events import (load_events, render_event_images, render_event_images_torch, split_equal_count,
                                      validate_events)
from sdalign_rt.models.video import load_video_frames, sample_frame_indices

_LAZY = {  # these import transformers: load them on first use
    "EventGPTConfig": "eventgpt", "EventGPTForCausalLM": "eventgpt", "expand_event_placeholder": "eventgpt",
    "EVENT_TOKEN_INDEX": "eventgpt", "load_pair": "pair", "save_tiny_pair": "pair", "synthetic_sample": "pair",
    "Pair": "pair", "PairSample": "pair", "PairInputs": "pair", "load_eventgpt": "eventgpt_checkpoint",
    "event_prompt_ids": "eventgpt_prompt", "SlowLlamaTokenizer": "llama_tokenizer",
}

__all__ = ["load_events", "render_event_images", "render_event_images_torch", "split_equal_count",
           "validate_events", "load_video_frames", "sample_frame_indices", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"sdalign_rt.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sdalign_rt.models' has no attribute {name!r}")
