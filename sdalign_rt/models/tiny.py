"""Random-weight models standing in for trained ones (tests, benchmarks, tiny checkpoints)."""
from __future__ import annotations

import torch

# Random-init logits are nearly flat, so greedy choices are near-ties and drafts are almost never accepted
# by sampling; scaling the LM head makes the distributions as peaked as a trained model's.
LM_HEAD_SCALE = 20.0


def finish_random_model(model, eos_token_id=None, pad_token_id: int = 0, scale: float = LM_HEAD_SCALE):
    """eval mode, a sharpened LM head, and explicit generation ids; returns the model."""
    model.eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = pad_token_id
    return model
