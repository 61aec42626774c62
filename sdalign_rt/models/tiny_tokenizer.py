"""A tiny LLaMA-style SentencePiece tokenizer, built from a word list (no training, no downloads).

The model has LLaMA's shape: <unk> <s> </s> at 0-2, the 256 byte-fallback pieces <0x00>..<0xFF> at 3-258 (so
"\\n" is <0x0A> = 13), then BPE pieces; identity normalisation, a dummy-prefix "▁", spaces kept. Each word
contributes "▁w", "▁wo", ... "▁word" (the only merges there are, so segmentation is fixed by the word list: a
listed word after a space is one piece, anything else falls back to single characters, then to bytes). The
protobuf is written by hand so that no protobuf package is needed.

`save_tiny_llama_tokenizer` writes the files transformers 4.37's slow LlamaTokenizer saved (what EventGPT's
checkpoints hold); `tiny_fast_llama_tokenizer` builds the same vocabulary as a transformers tokenizer (what
Video-LLaVA's transformers checkpoints hold).
"""
from __future__ import annotations

import json
import os
import struct

SPECIAL = ("<unk>", "<s>", "</s>")
BYTES = tuple(f"<0x{b:02X}>" for b in range(256))
# characters every tiny vocabulary spells singly: the event tokens' letters when they are plain text, digits
BASE_CHARS = "<>_/.,:;?!'\"-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def tiny_pieces(words) -> tuple[list[str], list[tuple[str, str]]]:
    """The BPE pieces after the special and byte pieces, in score order, and their merges."""
    pieces, merges = ["▁"], []
    for word in sorted(set(words)):
        for k in range(1, len(word) + 1):
            piece = "▁" + word[:k]
            if piece not in pieces:
                pieces.append(piece)
                merges.append((piece[:-1], piece[-1]))
    pieces += [c for c in sorted(set(BASE_CHARS + "".join(words))) if c not in pieces]
    return pieces, merges


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | 0x80 if n else low)
        if not n:
            return bytes(out)


def _message(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _integer(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def tiny_sentencepiece_model(words) -> bytes:
    """A serialized sentencepiece ModelProto (BPE, byte fallback, LLaMA's normaliser settings)."""
    normal, unknown, control, byte = 1, 2, 3, 6
    pieces, _ = tiny_pieces(words)
    entries = [(SPECIAL[0], 0.0, unknown), (SPECIAL[1], 0.0, control), (SPECIAL[2], 0.0, control)]
    entries += [(b, 0.0, byte) for b in BYTES]
    entries += [(p, -float(i), normal) for i, p in enumerate(pieces)]  # higher score merges first
    model = b"".join(_message(1, _message(1, p.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", s)
                              + _integer(3, t)) for p, s, t in entries)
    # trainer_spec: model_type BPE, byte_fallback, unk/bos/eos ids 0/1/2
    model += _message(2, _integer(3, 2) + _integer(35, 1) + _integer(40, 0) + _integer(41, 1) + _integer(42, 2))
    # normalizer_spec: "identity", add_dummy_prefix, keep extra whitespace, escape whitespace as ▁
    model += _message(3, _message(1, b"identity") + _integer(3, 1) + _integer(4, 0) + _integer(5, 1))
    return model


def save_tiny_llama_tokenizer(directory: str, words, *, legacy: bool | None = False,
                              added_tokens: tuple[str, ...] = ()) -> None:
    """tokenizer.model, tokenizer_config.json, special_tokens_map.json as a 4.37 slow LlamaTokenizer saved them.
    legacy=None leaves the key out (4.37 then read legacy as true); added_tokens are saved as added special
    tokens after the vocabulary."""
    os.makedirs(directory, exist_ok=True)
    model = tiny_sentencepiece_model(words)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(model)
    size = len(SPECIAL) + len(BYTES) + len(tiny_pieces(words)[0])
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    decoder = {str(i): {"content": t, **flags} for i, t in enumerate(SPECIAL)}
    decoder.update({str(size + i): {"content": t, **flags} for i, t in enumerate(added_tokens)})
    config = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder, "bos_token": "<s>",
              "clean_up_tokenization_spaces": False, "eos_token": "</s>", "model_max_length": 2048,
              "pad_token": None, "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>"}
    if added_tokens:
        config["additional_special_tokens"] = list(added_tokens)
    if legacy is not None:
        config["legacy"] = legacy
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if added_tokens:
        special_map["additional_special_tokens"] = list(added_tokens)
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        with open(os.path.join(directory, name), "w") as f:
            json.dump(content, f, indent=2)


def tiny_fast_llama_tokenizer(words, added_tokens: tuple[str, ...] = (), pad_token: str = "<unk>"):
    """The same vocabulary and merges as a transformers (tokenizers-backed) LlamaTokenizer, with added special
    tokens after the vocabulary."""
    from transformers import LlamaTokenizer

    pieces, merges = tiny_pieces(words)
    vocab = {t: i for i, t in enumerate((*SPECIAL, *BYTES, *pieces))}
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, pad_token=pad_token, add_bos_token=True)
    tokenizer.add_tokens(list(added_tokens), special_tokens=True)
    return tokenizer
