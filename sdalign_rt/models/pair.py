"""The real pair: EventGPT (drafter, event stream) and Video-LLaVA (verifier, 8 video frames).

`load_pair` loads both from local checkpoint directories (fp16 / bf16, or 4-bit NF4 through bitsandbytes,
optionally spread with accelerate's device_map) with their tokenizers / processors and the VocabMap between
the two vocabularies; `Pair.prepare(sample)` builds both models' inputs for one DSEC-style sample, each in
its own prompt template. `save_tiny_pair` writes tiny random checkpoints of both architectures in the same
layouts, so the whole path runs without downloads.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from sdalign_rt.decoder import SpeculativeDecoder
from sdalign_rt.models.eventgpt import EVENT_TOKEN_INDEX, EventGPTConfig, EventGPTForCausalLM
from sdalign_rt.models.events import load_events, render_event_images
from sdalign_rt.models.tiny import finish_random_model
from sdalign_rt.models.video import load_video_frames, write_video
from sdalign_rt.vocab import VocabMap

EVENTGPT_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")
EVENT_TOKENS = ("<ev_patch>", "<ev_start>", "<ev_end>")
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
    drafter_tokenizer: object
    verifier_processor: object  # VideoLlavaProcessor, or VideoLlavaInputs without torchvision
    event_processor: object  # CLIPImageProcessor
    vocab_map: VocabMap

    @staticmethod
    def drafter_prompt(question: str) -> str:
        return f"{EVENTGPT_SYSTEM} USER: <ev_start><event><ev_end>\n{question} ASSISTANT:"

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
        before, after = self.drafter_prompt(sample.question).split("<event>")
        ids = (self.drafter_tokenizer(before).input_ids + [EVENT_TOKEN_INDEX] * self.event_token_count()
               + self.drafter_tokenizer(after, add_special_tokens=False).input_ids)
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
              dtype: torch.dtype = torch.float16) -> Pair:
    """Load EventGPT and Video-LLaVA checkpoints (transformers layouts) with what prepares their inputs."""
    from transformers import AutoTokenizer, BitsAndBytesConfig, CLIPImageProcessor, VideoLlavaForConditionalGeneration

    for name, path in (("drafter", drafter_path), ("verifier", verifier_path)):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{name} checkpoint directory {path!r} does not exist")
    options = {"dtype": dtype}
    if load_in_4bit:
        options["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_compute_dtype=dtype)
    if device_map is not None:
        options["device_map"] = device_map
    drafter = EventGPTForCausalLM.from_pretrained(drafter_path, **options).eval()
    verifier = VideoLlavaForConditionalGeneration.from_pretrained(verifier_path, **options).eval()
    drafter_tokenizer = AutoTokenizer.from_pretrained(drafter_path)
    verifier_processor = _verifier_inputs_builder(verifier_path, verifier)
    clip_source = drafter_path if os.path.isfile(os.path.join(drafter_path, "preprocessor_config.json")) \
        else drafter.config.mm_visual_tower
    event_processor = CLIPImageProcessor.from_pretrained(clip_source)
    vocab_map = VocabMap.from_tokenizers(drafter_tokenizer, verifier_processor.tokenizer,
                                         draft_size=drafter.get_input_embeddings().num_embeddings,
                                         target_size=verifier.get_output_embeddings().weight.shape[0])
    return Pair(drafter, verifier, drafter_tokenizer, verifier_processor, event_processor, vocab_map)


def _word_tokenizer(words: list[str], added: tuple[str, ...]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<unk>")
    tokenizer.add_tokens(list(added), special_tokens=True)
    return tokenizer


def save_tiny_pair(directory: str, seed: int = 0, *, safe_serialization: bool = True) -> tuple[str, str]:
    """Tiny random EventGPT and Video-LLaVA checkpoints (+ tokenizers, processors) in the real layouts.

    Both tokenizers share a base vocabulary (the LLaMA part); EventGPT adds its event tokens, Video-LLaVA adds
    <image> and <video> on the same ids and pads its vocabulary, as the real pair does. safe_serialization=False
    writes sharded .bin files instead of safetensors. Returns the two paths.
    """
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, VideoLlavaConfig,
                              VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor)

    words = sorted({w for text in (EVENTGPT_SYSTEM, DEFAULT_QUESTION, "USER: ASSISTANT: the a car road street "
                                   "sky tree person building light sign left right") for w in text.replace(".", " ")
                    .replace(",", " ").replace("?", " ").replace("'", " ").split()})
    drafter_tok = _word_tokenizer(words, EVENT_TOKENS)
    verifier_tok = _word_tokenizer(words, ("<image>", "<video>"))
    base = len(words) + 3
    # Every Linear at least 64 wide: bitsandbytes' CPU 4-bit kernels quantize in blocks of 64 inputs.
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, projection_dim=64)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024)
    torch.manual_seed(seed)
    drafter = EventGPTForCausalLM(EventGPTConfig(vocab_size=base + len(EVENT_TOKENS), vision_config=vision,
                                                 mm_visual_tower="openai/clip-vit-large-patch14-336",
                                                 bos_token_id=1, eos_token_id=2, pad_token_id=0, **text))
    torch.manual_seed(seed + 1)
    verifier = VideoLlavaForConditionalGeneration(VideoLlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(vocab_size=base + 8, **text),
        image_token_index=base, video_token_index=base + 1))
    for model in (drafter, verifier):
        finish_random_model(model, eos_token_id=2, pad_token_id=0)
    drafter_dir, verifier_dir = os.path.join(directory, "eventgpt"), os.path.join(directory, "video_llava")
    drafter.save_pretrained(drafter_dir)
    if not safe_serialization:
        _as_bin_shards(drafter_dir)
    drafter_tok.save_pretrained(drafter_dir)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(drafter_dir)
    verifier.save_pretrained(verifier_dir)
    if not safe_serialization:
        _as_bin_shards(verifier_dir)
    # The tokenizer and image processor a VideoLlavaProcessor is made of (the processor object itself needs
    # torchvision in transformers 5; load_pair builds it when it can).
    verifier_tok.save_pretrained(verifier_dir)
    VideoLlavaImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(
        verifier_dir)
    return drafter_dir, verifier_dir


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
