"""EventGPT: event images → CLIP ViT → projector → feature adaptor → Vicuna (LLaMA), as a transformers model.

Layout of the public checkpoints (the authors' model/EventChatModel.py): a LlamaConfig subclass with model_type
"EventChat_llama" and the extra keys mm_visual_tower, event_feature_adaptor, mm_use_im_patch_token,
mm_use_im_start_end; weights nested under `model.` as that code's module tree names them:
model.visual_tower.visual_tower.vision_model.* (its `VisualTower` wraps the CLIPVisionModel one attribute down),
model.visual_projector.{0,2}.*, model.feature_adaptor.*, the LLaMA layers, plus lm_head. Per image, the CLIP
last hidden state [S, 1024] goes through the projector (Linear, GELU, Linear) and the feature adaptor (Linear,
applied once); a sample's P images give P temporal tokens (mean over each image's tokens) followed by S spatial
tokens (mean over images of each token): [P + S, D] event features. `eventgpt_checkpoint.load_eventgpt` reads
this layout, the older flat one (model.visual_tower.vision_model.*) and checkpoints without tower weights.

In the token ids, event features take the place of `event_token_index` (-200, out of vocabulary) tokens,
one per feature row, so a prompt's length is its length in the model (`expand_event_placeholder` turns the
single marker of the public prompt format into P + S of them). Decode steps carry no placeholder and
ignore event inputs.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                          LlamaForCausalLM, LlamaModel)

EVENT_TOKEN_INDEX = -200


class EventGPTConfig(LlamaConfig):
    model_type = "EventChat_llama"

    def __init__(self, mm_visual_tower: str | None = None, event_feature_adaptor: bool = True,
                 use_event_qformer: bool = False, vision_config: dict | None = None,
                 event_token_index: int = EVENT_TOKEN_INDEX, num_event_images: int = 5,
                 mm_use_im_patch_token: bool = True, mm_use_im_start_end: bool = False, **kwargs):
        self.mm_visual_tower = mm_visual_tower
        self.event_feature_adaptor = event_feature_adaptor
        self.use_event_qformer = use_event_qformer
        # the public loader's defaults: <ev_patch> added to the tokenizer, <ev_start>/<ev_end> not
        self.mm_use_im_patch_token = mm_use_im_patch_token
        self.mm_use_im_start_end = mm_use_im_start_end
        if isinstance(vision_config, CLIPVisionConfig):
            vision_config = vision_config.to_dict()
        self.vision_config = vision_config
        self.event_token_index = event_token_index
        self.num_event_images = num_event_images
        super().__init__(**kwargs)

    def clip_config(self) -> CLIPVisionConfig:
        if self.vision_config is not None:
            return CLIPVisionConfig(**{k: v for k, v in self.vision_config.items() if k != "model_type"})
        if self.mm_visual_tower is None or not os.path.isdir(self.mm_visual_tower):
            raise ValueError(f"EventGPTConfig needs vision_config or mm_visual_tower as a local CLIP folder, got "
                             f"{self.mm_visual_tower!r} (eventgpt_checkpoint.load_eventgpt resolves a bare name)")
        return CLIPVisionConfig.from_pretrained(self.mm_visual_tower)


class EventVisualTower(nn.Module):
    """The public code's `VisualTower`: the CLIP vision model one attribute down, which is what puts the tower's
    weights at model.visual_tower.visual_tower.* in its checkpoints."""

    def __init__(self, clip: CLIPVisionConfig):
        super().__init__()
        self.visual_tower = CLIPVisionModel(clip)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] → CLIP's last hidden state [N, S, C] (S = patches + CLS)."""
        tower = self.visual_tower
        return tower(pixel_values=pixel_values.to(tower.device, tower.dtype)).last_hidden_state


class EventGPTModel(LlamaModel):
    config_class = EventGPTConfig

    def __init__(self, config: EventGPTConfig):
        super().__init__(config)
        if config.use_event_qformer:
            raise ValueError("use_event_qformer=True checkpoints are not supported (their Q-Former is not built)")
        clip = config.clip_config()
        self.visual_tower = EventVisualTower(clip)
        self.visual_projector = nn.Sequential(nn.Linear(clip.hidden_size, config.hidden_size), nn.GELU(),
                                              nn.Linear(config.hidden_size, config.hidden_size))
        self.feature_adaptor = (nn.Linear(config.hidden_size, config.hidden_size)
                                if config.event_feature_adaptor else None)
        self.post_init()

    def encode_events(self, event_pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, P, 3, H, W] event images → [B, P + S, D]: P temporal then S spatial tokens."""
        if event_pixel_values.dim() != 5:
            raise ValueError(f"event_pixel_values must be [B, P, 3, H, W], got {tuple(event_pixel_values.shape)}")
        batch, images = event_pixel_values.shape[:2]
        tokens = self.visual_projector(self.visual_tower(event_pixel_values.flatten(0, 1)))
        if self.feature_adaptor is not None:
            tokens = self.feature_adaptor(tokens)
        tokens = tokens.view(batch, images, *tokens.shape[1:])  # [B, P, S, D]
        return torch.cat([tokens.mean(2), tokens.mean(1)], dim=1)


class EventGPTForCausalLM(LlamaForCausalLM):
    config_class = EventGPTConfig

    def __init__(self, config: EventGPTConfig):
        super().__init__(config)
        self.model = EventGPTModel(config)
        self.post_init()

    def encode_events(self, event_pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_events(event_pixel_values)

    def embed_with_events(self, input_ids: torch.Tensor, event_pixel_values=None, event_features=None):
        """Token embeddings with every event placeholder replaced, in order, by a row of event features."""
        marker = input_ids == self.config.event_token_index
        embeds = self.model.embed_tokens(input_ids.masked_fill(marker, 0))
        if not bool(marker.any()):
            return embeds
        if event_features is None:
            if event_pixel_values is None:
                raise ValueError("input_ids hold event placeholders but no event_pixel_values / event_features")
            event_features = self.encode_events(event_pixel_values)
        counts = marker.sum(-1)
        if bool((counts != event_features.shape[1]).any()):
            raise ValueError(f"each row needs {event_features.shape[1]} event placeholders (one per event feature), "
                             f"got {counts.tolist()}")
        return embeds.masked_scatter(marker[..., None], event_features.to(embeds.dtype))

    def forward(self, input_ids=None, event_pixel_values=None, event_features=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.embed_with_events(input_ids, event_pixel_values, event_features)
        return super().forward(input_ids=None, inputs_embeds=inputs_embeds, **kwargs)


def expand_event_placeholder(input_ids: torch.Tensor, count: int,
                             marker: int = EVENT_TOKEN_INDEX) -> torch.Tensor:
    """[L] ids with one `marker` → [L - 1 + count] ids with `count` markers (the public prompt's single
    <event> splice point, spelled out so that sequence lengths match the model's)."""
    if input_ids.dim() != 1:
        raise ValueError(f"expand_event_placeholder takes one prompt [L], got {tuple(input_ids.shape)}")
    where = torch.nonzero(input_ids == marker).flatten()
    if len(where) != 1:
        raise ValueError(f"the prompt must hold exactly one event marker {marker}, got {len(where)}")
    i = int(where[0])
    return torch.cat([input_ids[:i], input_ids.new_full((count,), marker), input_ids[i + 1:]])


AutoConfig.register(EventGPTConfig.model_type, EventGPTConfig, exist_ok=True)
AutoModelForCausalLM.register(EventGPTConfig, EventGPTForCausalLM, exist_ok=True)
