"""The slow LLaMA tokenizer's rules (transformers 4.37, use_fast=False, as EventGPT's scripts load it), pinned on a
tiny SentencePiece model: dummy prefix, "▁" after added tokens by `legacy`, lstrip / rstrip, files, added ids.
(The expectations were checked against transformers 4.37.2's LlamaTokenizer on the same files.)"""
import json

import pytest

pytest.importorskip("sentencepiece")

from sdalign_rt.models.llama_tokenizer import SlowLlamaTokenizer  # noqa: E402
from sdalign_rt.models.tiny_tokenizer import (BYTES, SPECIAL, save_tiny_llama_tokenizer,  # noqa: E402
                                              tiny_fast_llama_tokenizer, tiny_pieces)

WORDS = ["USER:", "What", "are", "the"]


def tokenizer(tmp_path, legacy, added=()):
    save_tiny_llama_tokenizer(str(tmp_path), WORDS, legacy=legacy, added_tokens=added)
    return SlowLlamaTokenizer.from_pretrained(str(tmp_path))


def test_tiny_model_is_llama_shaped(tmp_path):
    tok = tokenizer(tmp_path, legacy=True)
    base = len(SPECIAL) + len(BYTES) + len(tiny_pieces(WORDS)[0])
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.convert_tokens_to_ids("<0x0A>") == 13 and len(tok) == tok.vocab_size == base
    # a listed word after a space is one piece; other text falls back to characters, "\n" and "✓" to bytes
    assert tok.tokenize("What are\nthe ✓") == ["▁What", "▁are", "<0x0A>", "t", "h", "e", "▁",
                                                "<0xE2>", "<0x9C>", "<0x93>"]


@pytest.mark.parametrize("legacy", [True, False, None])
def test_text_without_added_tokens(tmp_path, legacy):
    """Both modes put one "▁" before the text and keep every space as "▁"; BOS first."""
    tok = tokenizer(tmp_path, legacy)
    assert tok.tokenize("<ev_end>\nWhat are  the ") == ["▁", "<", "e", "v", "_", "e", "n", "d", ">", "<0x0A>", "W",
                                                        "h", "a", "t", "▁are", "▁", "▁the", "▁"]
    ids = tok.encode("USER: What")
    assert ids[0] == 1 and tok.convert_tokens_to_ids(["▁USER:", "▁What"]) == ids[1:]
    assert tok.encode("USER: What", add_special_tokens=False) == ids[1:]


@pytest.mark.parametrize("legacy, after", [(True, ["▁", "<0x0A>"]), (None, ["▁", "<0x0A>"]), (False, ["<0x0A>"])])
def test_space_after_added_tokens(tmp_path, legacy, after):
    """legacy (true, or no key: 4.37's default) encodes each piece between added tokens with SentencePiece's
    dummy prefix, so a "▁" follows every added token; legacy false only prefixes the whole text, and drops that
    "▁" when the text starts with a special token."""
    tok = tokenizer(tmp_path, legacy)
    assert tok.add_tokens(["<ev_patch>"], special_tokens=True) == 1
    assert tok.add_tokens(["<ev_start>", "<ev_end>"], special_tokens=True) == 2
    base = tok.vocab_size
    assert [tok.convert_tokens_to_ids(t) for t in ("<ev_patch>", "<ev_start>", "<ev_end>")] == [base, base + 1,
                                                                                               base + 2]
    assert tok.tokenize("<ev_end>\nWhat") == ["<ev_end>", *after, "W", "h", "a", "t"]
    # before an added token the space stays a "▁" piece in both modes
    assert tok.tokenize("USER: <ev_start>") == ["▁USER:", "▁", "<ev_start>"]
    # mid-text: legacy puts the dummy "▁" after each added token again, legacy false keeps the text's own spaces
    middle = ["▁", "▁the"] if legacy in (True, None) else ["▁the"]
    assert tok.tokenize("What<ev_patch> the") == ["▁What", "<ev_patch>", *middle]
    assert tok.add_tokens(["<ev_end>"], special_tokens=True) == 0  # already there: no new id


def test_non_special_first_token_keeps_the_prefix(tmp_path):
    """legacy false drops the leading "▁" only before a special token: a token added as not special keeps it."""
    tok = tokenizer(tmp_path, legacy=False)
    tok.add_tokens(["<plain>"], special_tokens=False)
    tok.add_tokens(["<ev_end>"], special_tokens=True)
    assert tok.tokenize("<plain>x") == ["▁", "<plain>", "x"]
    assert tok.tokenize("<ev_end>x") == ["<ev_end>", "x"]


def test_saved_added_tokens_and_strip_flags(tmp_path):
    """Added tokens saved with the tokenizer keep their ids; their lstrip / rstrip flags eat neighbouring spaces."""
    save_tiny_llama_tokenizer(str(tmp_path), WORDS, legacy=False, added_tokens=("<ev_patch>", "<ev_start>"))
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    base = len(SPECIAL) + len(BYTES) + len(tiny_pieces(WORDS)[0])
    config["added_tokens_decoder"][str(base + 1)]["rstrip"] = True
    config["added_tokens_decoder"][str(base)]["lstrip"] = True
    config_path.write_text(json.dumps(config))
    tok = SlowLlamaTokenizer.from_pretrained(str(tmp_path))
    assert tok.add_tokens(["<ev_patch>", "<ev_start>", "<ev_end>"], special_tokens=True) == 1
    assert tok.convert_tokens_to_ids(["<ev_patch>", "<ev_start>", "<ev_end>"]) == [base, base + 1, base + 2]
    # <ev_start> rstrip: "  What" loses its spaces (so no "▁What" piece); <ev_patch> lstrip: "the  " loses its own
    assert tok.tokenize("the <ev_start>  What") == ["▁the", "▁", "<ev_start>", "W", "h", "a", "t"]
    assert tok.tokenize("the  <ev_patch> What") == ["▁the", "<ev_patch>", "▁What"]


def test_older_files_and_bad_input(tmp_path):
    """No added_tokens_decoder: special_tokens_map.json and added_tokens.json give the tokens (4.37's legacy read)."""
    save_tiny_llama_tokenizer(str(tmp_path), WORDS, legacy=None)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    base = len(SPECIAL) + len(BYTES) + len(tiny_pieces(WORDS)[0])
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<ev_patch>": base}))
    tok = SlowLlamaTokenizer.from_pretrained(str(tmp_path))
    assert tok.legacy and tok.convert_tokens_to_ids("<ev_patch>") == base and len(tok) == base + 1
    assert tok.decode(tok.encode("What are the"), skip_special_tokens=True) == "What are the"
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        SlowLlamaTokenizer.from_pretrained(str(tmp_path))


def test_fast_twin_shares_the_vocabulary(tmp_path):
    """Video-LLaVA's tiny tokenizer (transformers) has the same pieces on the same ids, plus its own tokens."""
    slow = tokenizer(tmp_path, legacy=False)
    fast = tiny_fast_llama_tokenizer(WORDS, ("<image>", "<video>"))
    vocab = fast.get_vocab()
    assert all(vocab[t] == i for t, i in slow.get_vocab().items())
    assert (vocab["<image>"], vocab["<video>"]) == (slow.vocab_size, slow.vocab_size + 1)
    assert fast("USER: What").input_ids == slow.encode("USER: What")
