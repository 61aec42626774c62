"""The real pair's model-side code: EventGPT (drafter) and Video-LLaVA (verifier) inputs and loaders."""
from sdalign_rt.models.events import load_events, render_event_images, split_equal_count, validate_events

__all__ = ["load_events", "render_event_images", "split_equal_count", "validate_events"]
