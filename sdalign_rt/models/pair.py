"""The real pair: EventGPT (drafter, event stream) and Video-LLaVA (verifier, 8 video frames).

`load_pair` loads both from local checkpoint directories (fp16 / bf16, or 4-bit NF4 through bitsandbytes,
optionally spread with accelerate's device_map) with their tokenizers / processors and the VocabMap between
the two vocabularies (EventGPT as published: `eventgpt_checkpoint.load_eventgpt`); `Pair.prepare(sample)` builds
both models' inputs for one DSEC-style sample, each in its own prompt template. `save_tiny_pair` writes tiny
random checkpoints of both architectures in the same layouts, so the whole path runs without downloads.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from sdalign_rt.decoder import SpeculativeDecoder
from sdalign_rt.models.eventgpt import EventGPTConfig, EventGPTForCausalLM
from sdalign_rt.models.eventgpt_checkpoint import NESTED_TOWER, TOWER, load_eventgpt
from sdalign_rt.models.eventgpt_prompt import (EVENTGPT_SYSTEM, event_prompt_ids, event_tokens_to_add,
                                               eventgpt_prompt)
from sdalign_rt.models.events import load_events, render_event_images
from sdalign_rt.models.tiny import finish_random_model
from sdalign_rt.models.video import load_video_frames, write_video
from sdalign_rt.vocab import VocabMap

DEFAULT_QUESTION = "What are the key elements in this scene?"


@dataclass
class PairSample:
    events: str | dict  # an event .npy file (pickled dict x, y, p, t) or such a dict
    frames: str | np.ndarray  # an mp4 (or any video file) or RGB frames [T, H, W, 3]
    question: str = DEFAULT_QUESTION


@dataclass
class PairInputs:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_inputs: dict
    draft_input_ids: torch.Tensor
    draft_attention_mask: torch.Tensor
    draft_inputs: dict = field(default_factory=dict)

    def generate_kwargs(self) -> dict:
        """Everything SpeculativeDecoder.generate takes besides max_new_tokens."""
        return {"attention_mask": self.attention_mask, "draft_input_ids": self.draft_input_ids,
                "draft_attention_mask": self.draft_attention_mask, "target_inputs": self.target_inputs,
                "draft_inputs": self.draft_inputs}


class VideoLlavaInputs:
    """The inputs VideoLlavaProcessor makes for one prompt and video, from its tokenizer and image processor:
    frames preprocessed as images, <video> expanded to frames x (patches + CLS) tokens. Used where the
    processor cannot be built (transformers 5's video processors need torchvision, which has no CPU build)."""

    def __init__(self, tokenizer, image_processor, patch_size: int, video_token: str = "<video>"):
        self.tokenizer, self.image_processor, self.patch_size = tokenizer, image_processor, patch_size
        self.video_token = video_token
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)

    def __call__(self, text: str, videos, return_tensors: str = "pt"):
        frames = list(videos[0])
        pixels = self.image_processor(images=frames, return_tensors="pt")
        pixels = pixels["pixel_values_images"] if "pixel_values_images" in pixels else pixels["pixel_values"]
        tokens = len(frames) * ((pixels.shape[-2] // self.patch_size) * (pixels.shape[-1] // self.patch_size) + 1)
        before, after = text.split(self.video_token)
        ids = (self.tokenizer(before).input_ids + [self.video_token_id] * tokens
               + self.tokenizer(after, add_special_tokens=False).input_ids)
        input_ids = torch.tensor([ids])
        return _Batch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values_videos=pixels[None])


@dataclass
class _Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values_videos: torch.Tensor


def _verifier_inputs_builder(verifier_path: str, verifier):
    from transformers import AutoTokenizer, VideoLlavaImageProcessor, VideoLlavaProcessor

    try:
        return VideoLlavaProcessor.from_pretrained(verifier_path)
    except (ImportError, AttributeError, OSError, ValueError, TypeError):
        return VideoLlavaInputs(AutoTokenizer.from_pretrained(verifier_path),
                                VideoLlavaImageProcessor.from_pretrained(verifier_path),
                                verifier.config.vision_config.patch_size)


@dataclass
class Pair:
    drafter: EventGPTForCausalLM
    verifier: object  # VideoLlavaForConditionalGeneration
    drafter_tokenizer: object  # SlowLlamaTokenizer: the public scripts' slow LLaMA tokenizer, event tokens added
    verifier_processor: object  # VideoLlavaProcessor, or VideoLlavaInputs without torchvision
    event_processor: object  # CLIPImageProcessor
    vocab_map: VocabMap

    @staticmethod
    def drafter_prompt(question: str) -> str:
        return eventgpt_prompt(question)

    @staticmethod
    def verifier_prompt(question: str) -> str:
        return f"USER: <video>\n{question} ASSISTANT:"

    def event_token_count(self) -> int:
        """P temporal + S spatial feature rows (5 + 577 for ViT-L/14 at 336 px)."""
        clip = self.drafter.config.clip_config()
        return self.drafter.config.num_event_images + (clip.image_size // clip.patch_size) ** 2 + 1

    def prepare(self, sample: PairSample) -> PairInputs:
        device = self.verifier.device
        events = load_events(sample.events) if isinstance(sample.events, (str, os.PathLike)) else sample.events
        images = render_event_images(events, parts=self.drafter.config.num_event_images)
        event_pixels = self.event_processor(images=images, return_tensors="pt").pixel_values[None]
        ids = event_prompt_ids(self.drafter_tokenizer, self.drafter_prompt(sample.question), self.event_token_count())
        draft_ids = torch.tensor([ids], device=self.drafter.device)
        frames = load_video_frames(sample.frames)
        verifier = self.verifier_processor(text=self.verifier_prompt(sample.question), videos=[list(frames)],
                                           return_tensors="pt")
        return PairInputs(
            input_ids=verifier.input_ids.to(device), attention_mask=verifier.attention_mask.to(device),
            target_inputs={"pixel_values_videos": verifier.pixel_values_videos.to(device, self.verifier.dtype)},
            draft_input_ids=draft_ids, draft_attention_mask=torch.ones_like(draft_ids),
            draft_inputs={"event_pixel_values": event_pixels.to(self.drafter.device, self.drafter.dtype)})

    def decoder(self, **kwargs) -> SpeculativeDecoder:
        return SpeculativeDecoder(target=self.verifier, draft=self.drafter, vocab_map=self.vocab_map,
                                  pad_token_id=self.verifier_processor.tokenizer.pad_token_id, **kwargs)


def load_pair(drafter_path: str, verifier_path: str, *, load_in_4bit: bool = False, device_map=None,
              dtype: torch.dtype = torch.float16, clip_dir: str | None = None) -> Pair:
    """Load EventGPT (as published; clip_dir: where its mm_visual_tower may be) and Video-LLaVA (transformers
    layout) with what prepares their inputs."""
    from transformers import BitsAndBytesConfig, VideoLlavaForConditionalGeneration

    for name, path in (("drafter", drafter_path), ("verifier", verifier_path)):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{name} checkpoint directory {path!r} does not exist")
    options = {"dtype": dtype}
    if load_in_4bit:
        options["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_compute_dtype=dtype)
    if device_map is not None:
        options["device_map"] = device_map
    eventgpt = load_eventgpt(drafter_path, clip_dir=clip_dir, **options)
    drafter = eventgpt.model
    verifier = VideoLlavaForConditionalGeneration.from_pretrained(verifier_path, **options).eval()
    verifier_processor = _verifier_inputs_builder(verifier_path, verifier)
    # the drafter's vocabulary as its loader leaves it (event tokens added, embeddings resized to match)
    vocab_map = VocabMap.from_tokenizers(eventgpt.tokenizer, verifier_processor.tokenizer,
                                         draft_size=drafter.get_input_embeddings().num_embeddings,
                                         target_size=verifier.get_output_embeddings().weight.shape[0])
    return Pair(drafter, verifier, eventgpt.tokenizer, verifier_processor, eventgpt.event_processor, vocab_map)


TINY_LAYOUTS = ("nested", "flat", "none")
TINY_TOWER = "clip-vit-tiny-patch14-28"  # the tiny stand-in for clip-vit-large-patch14-336, next to the checkpoint


def save_tiny_pair(directory: str, seed: int = 0, *, safe_serialization: bool = True, layout: str = "nested",
                   start_end: bool = False, legacy: bool | None = False) -> tuple[str, str]:
    """Tiny random EventGPT and Video-LLaVA checkpoints (+ tokenizers, processors) in the real layouts.

    EventGPT as published (see eventgpt_checkpoint): layout "nested" has the public tower names
    (model.visual_tower.visual_tower.vision_model.*) and a public config (no vision_config; mm_visual_tower the bare
    name of a CLIP folder saved next to the checkpoint, which holds the image processor); "none" leaves the tower
    weights out and points mm_visual_tower at that folder's path; "flat" is this package's earlier layout
    (model.visual_tower.*, vision_config and preprocessor_config.json in the checkpoint). start_end sets
    mm_use_im_start_end (<ev_start>/<ev_end> become added tokens); legacy is the tokenizer's 4.37 setting.
    The drafter's tokenizer is a LLaMA-style SentencePiece model saved as the slow tokenizer saved it, without
    event tokens (the loader adds them; the checkpoint has their embedding rows). Video-LLaVA's tokenizer has the
    same pieces with <image> and <video> on the same ids and a padded vocabulary, as the real pair does.
    safe_serialization=False writes sharded .bin files instead of safetensors. Returns the two paths.
    """
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, LlamaConfig,
                              VideoLlavaConfig, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor)

    from sdalign_rt.models.tiny_tokenizer import (BYTES, SPECIAL, save_tiny_llama_tokenizer, tiny_fast_llama_tokenizer,
                                                  tiny_pieces)

    if layout not in TINY_LAYOUTS:
        raise ValueError(f"layout must be one of {TINY_LAYOUTS}, got {layout!r}")
    words = (f"{EVENTGPT_SYSTEM} {DEFAULT_QUESTION} USER: ASSISTANT: the a car road street sky tree person building "
             "light sign left right").split()
    base = len(SPECIAL) + len(BYTES) + len(tiny_pieces(words)[0])
    # Every Linear at least 64 wide: bitsandbytes' CPU 4-bit kernels quantize in blocks of 64 inputs.
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, projection_dim=64)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024)
    flags = dict(mm_use_im_patch_token=True, mm_use_im_start_end=start_end)
    event_tokens = event_tokens_to_add(EventGPTConfig(**flags))
    torch.manual_seed(seed)
    drafter = EventGPTForCausalLM(EventGPTConfig(
        vocab_size=base + len(event_tokens), vision_config=vision, mm_visual_tower="openai/clip-vit-large-patch14-336",
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **flags, **text))
    torch.manual_seed(seed + 1)
    verifier = VideoLlavaForConditionalGeneration(VideoLlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(vocab_size=base + 8, **text),
        image_token_index=base, video_token_index=base + 1))
    for model in (drafter, verifier):
        finish_random_model(model, eos_token_id=2, pad_token_id=0)
    drafter_dir, verifier_dir = os.path.join(directory, "eventgpt"), os.path.join(directory, "video_llava")
    processor = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    drafter.save_pretrained(drafter_dir)
    if layout == "flat":
        CLIPImageProcessor(**processor).save_pretrained(drafter_dir)
    else:
        # the CLIP download (a whole CLIPModel, text half included) holding the drafter's tower and the processor
        clip_dir = os.path.join(directory, TINY_TOWER)
        text_half = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        clip = CLIPModel(CLIPConfig(text_config=text_half, vision_config=vision, projection_dim=64))
        clip.vision_model.load_state_dict(drafter.model.visual_tower.visual_tower.state_dict())
        clip.save_pretrained(clip_dir)
        CLIPImageProcessor(**processor).save_pretrained(clip_dir)
        _public_config(drafter_dir, TINY_TOWER if layout == "nested" else os.path.abspath(clip_dir))
    _rename_tower(drafter_dir, layout)
    if not safe_serialization:
        _as_bin_shards(drafter_dir)
    save_tiny_llama_tokenizer(drafter_dir, words, legacy=legacy)
    verifier.save_pretrained(verifier_dir)
    if not safe_serialization:
        _as_bin_shards(verifier_dir)
    # The tokenizer and image processor a VideoLlavaProcessor is made of (the processor object itself needs
    # torchvision in transformers 5; load_pair builds it when it can).
    tiny_fast_llama_tokenizer(words, ("<image>", "<video>")).save_pretrained(verifier_dir)
    VideoLlavaImageProcessor(**processor).save_pretrained(verifier_dir)
    return drafter_dir, verifier_dir


def _public_config(directory: str, tower: str) -> None:
    """config.json as the public release has it: no vision_config (the tower folder has it), mm_visual_tower."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.pop("vision_config", None)
    config["mm_visual_tower"] = tower
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def _rename_tower(directory: str, layout: str) -> None:
    """model.safetensors' tower weights under the layout's names (transformers 5 saves them nested, without
    CLIP's transformers-4 `vision_model.` level): nested → with it, flat → model.visual_tower.*, none → absent."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    state = load_file(path)
    renamed = {}
    for name, tensor in state.items():
        if name.startswith(NESTED_TOWER):
            rest = name[len(NESTED_TOWER):]
            if layout == "none":
                continue
            name = NESTED_TOWER + "vision_model." + rest if layout == "nested" else TOWER + rest
        renamed[name] = tensor
    save_file(renamed, path, metadata={"format": "pt"})


def _as_bin_shards(directory: str, shards: int = 2) -> None:
    """Rewrite model.safetensors as pytorch_model-0000k-of-0000n.bin shards with their index (the layout of
    the public EventGPT release; transformers 5 only writes safetensors itself)."""
    from safetensors.torch import load_file

    path = os.path.join(directory, "model.safetensors")
    state = load_file(path)
    names = sorted(state)
    weight_map = {}
    for k in range(shards):
        shard = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[k::shards]}
        torch.save(part, os.path.join(directory, shard))
        weight_map.update({n: shard for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    os.remove(path)


def synthetic_sample(directory: str, seed: int = 0, question: str = DEFAULT_QUESTION) -> PairSample:
    """A DSEC-style sample on disk: event_npy/seq/clip.npy (x, y, p, t) and mp4/seq/clip.mp4 (16 RGB frames)."""
    rng = np.random.default_rng(seed)
    count = 4000
    events = {"x": rng.integers(0, 64, count), "y": rng.integers(0, 48, count), "p": rng.integers(0, 2, count),
              "t": np.sort(rng.integers(0, 50_000, count))}
    event_path = os.path.join(directory, "event_npy", "seq", f"clip{seed}.npy")
    video_path = os.path.join(directory, "mp4", "seq", f"clip{seed}.mp4")
    for path in (event_path, video_path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(event_path, events, allow_pickle=True)
    write_video(video_path, rng.integers(0, 255, (16, 48, 64, 3)).astype(np.uint8))
    with open(os.path.join(directory, "instructions.json"), "w") as f:
        json.dump([{"event": event_path, "video": video_path, "question": question}], f)
    return PairSample(events=event_path, frames=video_path, question=question)
