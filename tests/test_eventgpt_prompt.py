"""Golden EventGPT prompts and ids, from the public code's rules written out here:
- dataset/conversation.py, conv "eventgpt_v1": SeparatorStyle.TWO, sep " ", sep2 "</s>", roles USER / ASSISTANT,
  the system line below; prepare_event_prompt: "<ev_start><event><ev_end>\\n" + question as the user turn, then
  "ASSISTANT:" with no message;
- inference.py: add_tokens(["<ev_patch>"], special) if mm_use_im_patch_token (default true), then
  add_tokens(["<ev_start>", "<ev_end>"], special) if mm_use_im_start_end (default false); slow LLaMA tokenizer;
- common/common.py tokenizer_event_token: chunks around "<event>" tokenized with BOS, BOS kept once, -200 between;
then the -200 spelled out once per event feature row (5 + 577 for ViT-L/14-336, 5 + 5 for the tiny tower)."""
from types import SimpleNamespace

import pytest

pytest.importorskip("sentencepiece")
pytest.importorskip("transformers")

from transformers import CLIPVisionConfig  # noqa: E402

from sdalign_rt.models.eventgpt import EVENT_TOKEN_INDEX, EventGPTConfig  # noqa: E402
from sdalign_rt.models.eventgpt_prompt import (event_prompt_ids, eventgpt_prompt,  # noqa: E402
                                               load_eventgpt_tokenizer)
from sdalign_rt.models.pair import Pair  # noqa: E402
from sdalign_rt.models.tiny_tokenizer import BYTES, SPECIAL, save_tiny_llama_tokenizer, tiny_pieces  # noqa: E402

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")
QUESTION = "What are the key elements in this scene?"
WORDS = f"{SYSTEM} {QUESTION} USER: ASSISTANT:".split()
BASE = len(SPECIAL) + len(BYTES) + len(tiny_pieces(WORDS)[0])


def conversation_two(system, roles, messages, seps=(" ", "</s>")):
    """conversation.py's SeparatorStyle.TWO get_prompt, spelled out."""
    text = system + seps[0]
    for i, (role, message) in enumerate(zip(roles, messages)):
        text += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return text


def test_prompt_string():
    expected = conversation_two(SYSTEM, ("USER", "ASSISTANT"), ("<ev_start><event><ev_end>\n" + QUESTION, None))
    assert eventgpt_prompt(QUESTION) == expected
    assert expected == (SYSTEM + " USER: <ev_start><event><ev_end>\nWhat are the key elements in this scene? "
                        "ASSISTANT:")


def ids_of(pieces):
    """Tiny-vocabulary ids: <unk> <s> </s>, bytes, the word pieces, then the added event tokens."""
    vocab = {t: i for i, t in enumerate((*SPECIAL, *BYTES, *tiny_pieces(WORDS)[0]))}
    vocab.update({"<ev_patch>": BASE, "<ev_start>": BASE + 1, "<ev_end>": BASE + 2})
    return [p if isinstance(p, int) else vocab[p] for p in pieces]


LETTERS = {"<ev_start>": ["<", "e", "v", "_", "s", "t", "a", "r", "t", ">"], "<ev_end>": ["<", "e", "v", "_", "e",
                                                                                       "n", "d", ">"]}
HEAD = ["<s>", *("▁" + w for w in SYSTEM.split()), "▁USER:"]
TAIL = ["W", "h", "a", "t", *("▁" + w for w in QUESTION.split()[1:]), "▁ASSISTANT:"]


@pytest.mark.parametrize("start_end, legacy, expected", [
    # <ev_start>/<ev_end> plain text: each chunk gets SentencePiece's leading "▁" (the second after its BOS is cut)
    (False, False, HEAD + ["▁", *LETTERS["<ev_start>"], "EVENTS", "▁", *LETTERS["<ev_end>"], "<0x0A>", *TAIL]),
    (False, True, HEAD + ["▁", *LETTERS["<ev_start>"], "EVENTS", "▁", *LETTERS["<ev_end>"], "<0x0A>", *TAIL]),
    # added tokens: "USER: " keeps its space as "▁"; after <ev_end> a "▁" only in legacy mode
    (True, False, HEAD + ["▁", "<ev_start>", "EVENTS", "<ev_end>", "<0x0A>", *TAIL]),
    (True, True, HEAD + ["▁", "<ev_start>", "EVENTS", "<ev_end>", "▁", "<0x0A>", *TAIL]),
])
@pytest.mark.parametrize("count", [1, 10, 582])
def test_prompt_ids(tmp_path, start_end, legacy, expected, count):
    save_tiny_llama_tokenizer(str(tmp_path), WORDS, legacy=legacy)
    config = EventGPTConfig(mm_use_im_start_end=start_end)
    tokenizer, added = load_eventgpt_tokenizer(str(tmp_path), config)
    assert added == (["<ev_patch>", "<ev_start>", "<ev_end>"] if start_end else ["<ev_patch>"])
    where = expected.index("EVENTS")
    golden = ids_of(expected[:where]) + [EVENT_TOKEN_INDEX] * count + ids_of(expected[where + 1:])
    ids = event_prompt_ids(tokenizer, eventgpt_prompt(QUESTION), count)
    assert ids == golden
    # literal ids around the splice: BOS 1, "▁" 259 (the first piece after the bytes), "<0x0A>" 13, <ev_*> BASE + k
    after = ids[ids.index(EVENT_TOKEN_INDEX) + count:][:3]
    before = ids[ids.index(EVENT_TOKEN_INDEX) - 2:ids.index(EVENT_TOKEN_INDEX)]
    if start_end:
        assert before == [259, BASE + 1]
        assert after == ([BASE + 2, 259, 13] if legacy else [BASE + 2, 13, ids_of(["W"])[0]])
    else:
        assert before[-1] == ids_of([">"])[0] and after == [259] + ids_of(["<", "e"])
    assert ids[0] == 1 and ids.count(EVENT_TOKEN_INDEX) == count and len(ids) == len(expected) - 1 + count


def test_saved_event_tokens_are_not_added_again(tmp_path):
    save_tiny_llama_tokenizer(str(tmp_path), WORDS, legacy=False, added_tokens=("<ev_patch>", "<ev_start>", "<ev_end>"))
    tokenizer, added = load_eventgpt_tokenizer(str(tmp_path), EventGPTConfig(mm_use_im_start_end=True))
    assert added == [] and len(tokenizer) == BASE + 3
    ids = event_prompt_ids(tokenizer, eventgpt_prompt(QUESTION))
    assert ids[len(HEAD):len(HEAD) + 5] == [259, BASE + 1, EVENT_TOKEN_INDEX, BASE + 2, 13]
    no_patch = EventGPTConfig(mm_use_im_patch_token=False)
    save_tiny_llama_tokenizer(str(tmp_path), WORDS, legacy=False)
    assert load_eventgpt_tokenizer(str(tmp_path), no_patch)[1] == []


def test_event_feature_count_and_bad_prompts(tmp_path):
    """5 event images + (336 / 14)^2 patches + CLS = 582 placeholders for the released tower."""
    config = EventGPTConfig(vision_config=CLIPVisionConfig(image_size=336, patch_size=14))
    assert Pair.event_token_count(SimpleNamespace(drafter=SimpleNamespace(config=config))) == 5 + 577
    save_tiny_llama_tokenizer(str(tmp_path), WORDS)
    tokenizer, _ = load_eventgpt_tokenizer(str(tmp_path), EventGPTConfig())
    with pytest.raises(ValueError, match="exactly one <event>"):
        event_prompt_ids(tokenizer, "no marker here")
    with pytest.raises(ValueError, match="exactly one <event>"):
        event_prompt_ids(tokenizer, "<event> twice <event>")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_eventgpt_tokenizer(str(tmp_path / "missing"), EventGPTConfig())
