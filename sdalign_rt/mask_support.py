"""Which attention the runtime's masks can drive: implementations that honour a custom mask, and windows.

The runtime decodes trees and left-padded rows with its own masks. transformers' flash / flex / paged attention
build their own causal masking and would silently drop them; a sliding window masks what the runtime's
full-prefix attention would see. Both are decided from a model's config, without importing transformers.
"""
from __future__ import annotations

# Attention implementations that build their own (causal) masking and would silently drop a tree mask.
MASK_IGNORING = ("flash_attention_2", "flash_attention_3", "flex_attention", "paged_attention")


def sliding_window(config) -> int | None:
    """The attention window of a decoder config, None when every layer attends to the whole prefix (Qwen2 sets
    a window that only its use_sliding_window flag turns on)."""
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return None
    return window


def check_mask_respected(config, who: str) -> None:
    """A clear error where transformers would decode with a causal mask instead of the tree mask."""
    implementation = getattr(config, "_attn_implementation", None) or ""
    if any(implementation.startswith(name) for name in MASK_IGNORING):
        raise ValueError(f"{who} uses attn_implementation={implementation!r}, which ignores a custom attention mask: "
                         "tree and padding masks would be silently replaced by a causal one. Load it with "
                         "attn_implementation='sdpa' or 'eager' (LLaMA-shaped models run the lean forward instead)")
    window = sliding_window(config)
    if window:
        raise ValueError(f"{who} uses sliding-window attention (sliding_window={window}), which the runtime's "
                         "static cache and tree masks do not implement")
