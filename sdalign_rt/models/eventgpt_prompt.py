"""EventGPT's prompt, added tokens and prompt ids, by the public inference code's rules.

- Prompt: conv mode "eventgpt_v1" (dataset/conversation.py) is Vicuna v1 (SeparatorStyle.TWO, separators " " and
  "</s>", roles USER / ASSISTANT) with the system line below; `prepare_event_prompt` puts
  "<ev_start><event><ev_end>\\n" before the question, whatever the checkpoint's flags.
- Added tokens (inference.py): <ev_patch> when config.mm_use_im_patch_token (default true), then <ev_start> and
  <ev_end> when config.mm_use_im_start_end (default false), each `add_tokens(..., special_tokens=True)`; the
  embeddings are then resized to the tokenizer's length. When <ev_start>/<ev_end> are not added they are plain
  text pieces of the prompt.
- Ids (common/common.py `tokenizer_event_token`): the prompt is cut at "<event>", each chunk tokenized on its own
  with BOS, the first chunk's BOS kept and every chunk's first id dropped, -200 between the chunks. The tokenizer
  is the slow LLaMA one (`SlowLlamaTokenizer`): whether a "▁" follows an added <ev_end> depends on its `legacy`.
Here the single -200 is then spelled out once per event feature row (5 + 577 for ViT-L/14-336).
"""
from __future__ import annotations

import os

from sdalign_rt.models.eventgpt import EVENT_TOKEN_INDEX
from sdalign_rt.models.llama_tokenizer import SlowLlamaTokenizer

EVENTGPT_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")
EVENT_TOKEN = "<event>"
EVENT_PATCH_TOKEN, EV_START_TOKEN, EV_END_TOKEN = "<ev_patch>", "<ev_start>", "<ev_end>"
EVENT_TOKENS = (EVENT_PATCH_TOKEN, EV_START_TOKEN, EV_END_TOKEN)


def eventgpt_prompt(question: str) -> str:
    """The eventgpt_v1 prompt for one question, ready for the assistant's answer."""
    return f"{EVENTGPT_SYSTEM} USER: {EV_START_TOKEN}{EVENT_TOKEN}{EV_END_TOKEN}\n{question} ASSISTANT:"


def event_tokens_to_add(config) -> list[str]:
    """The tokens the public loader adds for this config, in its order."""
    tokens = [EVENT_PATCH_TOKEN] if getattr(config, "mm_use_im_patch_token", True) else []
    if getattr(config, "mm_use_im_start_end", False):
        tokens += [EV_START_TOKEN, EV_END_TOKEN]
    return tokens


def add_event_tokens(tokenizer, config) -> list[str]:
    """Add the config's event tokens as the public loader does (two add_tokens calls); returns the ones that got
    new ids (none when the saved tokenizer holds them already)."""
    before = set(tokenizer.get_vocab())
    if getattr(config, "mm_use_im_patch_token", True):
        tokenizer.add_tokens([EVENT_PATCH_TOKEN], special_tokens=True)
    if getattr(config, "mm_use_im_start_end", False):
        tokenizer.add_tokens([EV_START_TOKEN, EV_END_TOKEN], special_tokens=True)
    return [t for t in tokenizer.get_vocab() if t not in before]


def load_eventgpt_tokenizer(directory: str, config) -> tuple[SlowLlamaTokenizer, list[str]]:
    """The checkpoint's slow LLaMA tokenizer with the config's event tokens added; also the newly added tokens."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"EventGPT checkpoint directory {directory!r} does not exist")
    tokenizer = SlowLlamaTokenizer.from_pretrained(directory)
    return tokenizer, add_event_tokens(tokenizer, config)


def event_prompt_ids(tokenizer, prompt: str, event_count: int = 1, marker: int = EVENT_TOKEN_INDEX) -> list[int]:
    """Prompt ids with the one "<event>" as `event_count` markers (1: exactly the public tokenizer_event_token)."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(EVENT_TOKEN)]
    if len(chunks) != 2:
        raise ValueError(f"an EventGPT prompt holds exactly one {EVENT_TOKEN}, got {len(chunks) - 1}")
    if event_count < 1:
        raise ValueError(f"event_count must be at least 1, got {event_count}")
    # the public rule drops each chunk's first id when the first chunk starts with BOS (assuming every chunk does)
    first = chunks[0]
    offset = 1 if first and first[0] == tokenizer.bos_token_id else 0
    return first[:offset] + first[offset:] + [marker] * event_count + chunks[1][offset:]
