"""The real pair's model-side code: EventGPT (drafter) and Video-LLaVA (verifier) inputs and loaders."""
from sdalign_rt.models.events import load_events, render_event_images, split_equal_count, validate_events

__all__ = ["load_events", "render_event_images", "split_equal_count", "validate_events", "EventGPTConfig",
           "EventGPTForCausalLM", "expand_event_placeholder"]


def __getattr__(name):  # the model classes import transformers: load them on first use
    if name in ("EventGPTConfig", "EventGPTForCausalLM", "expand_event_placeholder", "EVENT_TOKEN_INDEX"):
        from sdalign_rt.models import eventgpt

        return getattr(eventgpt, name)
    raise AttributeError(name)
