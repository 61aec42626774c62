"""The LLaMA SentencePiece tokenizer as EventGPT's public scripts run it.

Their scripts load `AutoTokenizer.from_pretrained(path, use_fast=False)` under transformers 4.37: the slow
LlamaTokenizer over sentencepiece. transformers 5 has no slow tokenizers (use_fast is ignored) and defaults
`legacy` to False where 4.37 read a missing `legacy` as True, so the drafter's ids are computed here, by 4.37's
rules, from the checkpoint's own files (tokenizer.model, tokenizer_config.json, special_tokens_map.json,
added_tokens.json):

- text is split on the added tokens (longest match first); one with lstrip / rstrip eats the whitespace beside it;
- legacy (tokenizer_config `"legacy": true`, or no such key): every text piece is encoded by SentencePiece as is,
  so each piece gets the model's dummy-prefix "▁", the one right after an added token too
  ("<ev_end>\\n" → <ev_end> ▁ <0x0A>);
- `"legacy": false`: one "▁" goes before the whole text (dropped when the text starts with a special token) and
  SentencePiece's dummy prefix is off, so a piece after an added token gets none ("<ev_end>\\n" → <ev_end> <0x0A>);
- BOS (add_bos_token, default true) before the ids, EOS (add_eos_token, default false) after them.

The vocabulary is SentencePiece's pieces plus the added tokens; `add_tokens` appends new ones after it. Only
what the drafter needs is here (encoding, the vocabulary, adding tokens, a plain decode).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

SPIECE_UNDERLINE = "▁"


@dataclass(frozen=True)
class AddedToken:
    content: str
    lstrip: bool = False
    rstrip: bool = False
    special: bool = True


@dataclass
class Encoding:
    input_ids: list[int]


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json store it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _without_dummy_prefix(model: bytes) -> bytes:
    """The model with NormalizerSpec.add_dummy_prefix = false, as 4.37 loads it when legacy is false. Protobuf
    merges a repeated singular message field into the first one, so appending `normalizer_spec {add_dummy_prefix:
    false}` (field 3 holding field 3 = 0) is what its `MergeFrom` did, without needing protobuf here."""
    return model + b"\x1a\x02\x18\x00"


class SlowLlamaTokenizer:
    def __init__(self, model_file: str, *, legacy: bool = True, add_bos_token: bool = True,
                 add_eos_token: bool = False, unk_token: str = "<unk>", bos_token: str | None = "<s>",
                 eos_token: str | None = "</s>", pad_token: str | None = None,
                 added_tokens: dict[int, AddedToken] | None = None, additional_special_tokens=()):
        try:
            import sentencepiece as spm
        except ImportError as e:
            raise ImportError("EventGPT's tokenizer (tokenizer.model, LLaMA SentencePiece) needs sentencepiece: "
                              "pip install sentencepiece") from e
        with open(model_file, "rb") as f:
            model = f.read()
        self.sp_model = spm.SentencePieceProcessor()
        self.sp_model.LoadFromSerializedProto(model if legacy else _without_dummy_prefix(model))
        self.model_file, self.legacy = model_file, legacy
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.unk_token, self.bos_token, self.eos_token, self.pad_token = unk_token, bos_token, eos_token, pad_token
        self.additional_special_tokens = list(additional_special_tokens)
        self._added: dict[int, AddedToken] = dict(added_tokens or {})
        # the special tokens are added tokens at their SentencePiece ids when not listed already (as 4.37 does)
        for token in (unk_token, bos_token, eos_token, pad_token, *self.additional_special_tokens):
            if token is not None and token not in self.added_tokens_encoder:
                self._register(token, special=True)
        self._unk_length = len(self.sp_model.encode(str(unk_token)))

    @classmethod
    def from_pretrained(cls, directory: str) -> "SlowLlamaTokenizer":
        """Read a checkpoint's tokenizer files the way 4.37's slow tokenizer did."""
        model_file = os.path.join(directory, "tokenizer.model")
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"{directory!r} has no tokenizer.model: EventGPT's scripts load the LLaMA "
                                    "SentencePiece tokenizer (use_fast=False), which needs that file")
        config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(directory, "special_tokens_map.json"))
        added: dict[int, AddedToken] = {}
        if "added_tokens_decoder" in config:
            for index, token in config["added_tokens_decoder"].items():
                added[int(index)] = AddedToken(token["content"], bool(token.get("lstrip", False)),
                                               bool(token.get("rstrip", False)), bool(token.get("special", False)))
        else:  # older saves: special_tokens_map.json fills the special tokens, added_tokens.json the added ones
            config = {**special_map, **config}
        extra = [_token_text(t) for t in config.get("additional_special_tokens") or []]
        names = {key: _token_text(config[key]) if key in config else default for key, default in
                 (("unk_token", "<unk>"), ("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", None))}
        if "added_tokens_decoder" not in config:
            special = {t for t in (*names.values(), *extra) if t is not None}
            for token, index in _read_json(os.path.join(directory, "added_tokens.json")).items():
                added[int(index)] = AddedToken(token, special=token in special)
        legacy = config.get("legacy")
        return cls(model_file, legacy=True if legacy is None else bool(legacy),
                   add_bos_token=config.get("add_bos_token", True), add_eos_token=config.get("add_eos_token", False),
                   added_tokens=added, additional_special_tokens=extra, **names)

    # --- vocabulary -------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """SentencePiece's pieces, without the added tokens."""
        return self.sp_model.get_piece_size()

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        return {token.content: index for index, token in sorted(self._added.items())}

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(sorted(self._added.items()))

    @property
    def all_special_tokens(self) -> list[str]:
        named = [self.bos_token, self.eos_token, self.unk_token, self.pad_token]
        return [t for t in dict.fromkeys([*named, *self.additional_special_tokens]) if t is not None]

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def __len__(self) -> int:
        return len(self.get_vocab())

    def _register(self, content: str, special: bool) -> bool:
        """Give `content` an id (its piece id if SentencePiece has it, else the next free one); True if new."""
        vocab = self.get_vocab()
        index = vocab.get(content, len(vocab))
        self._added[index] = AddedToken(content, special=special)
        return content not in vocab

    def add_tokens(self, tokens, special_tokens: bool = False) -> int:
        """Add tokens that are not added tokens yet, in order, after the vocabulary; returns how many got new ids.
        Newly added special tokens count as special in encoding (4.37 listed them as additional special tokens);
        tokens already present keep their saved flags."""
        new = 0
        for token in [tokens] if isinstance(tokens, str) else tokens:
            if not token or token in self.added_tokens_encoder:
                continue
            special = special_tokens or token in self.all_special_tokens
            new += self._register(token, special)
            if special and token not in self.all_special_tokens:
                self.additional_special_tokens.append(token)
        return new

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: str) -> int:
        added = self.added_tokens_encoder.get(token)
        return added if added is not None else self.sp_model.piece_to_id(token)

    @property
    def unk_token_id(self) -> int:
        return self._token_to_id(self.unk_token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self._token_to_id(self.pad_token)

    # --- encoding ---------------------------------------------------------------------------------------------
    def _split_on_added(self, text: str) -> list[tuple[str, bool]]:
        """[(piece, is_added_token)]: the text cut at its added tokens, longest match first, with lstrip / rstrip
        applied to the neighbouring text."""
        contents = sorted(self.added_tokens_encoder, key=len, reverse=True)
        if not contents:
            return [(text, False)]
        parts = re.split("(" + "|".join(re.escape(c) for c in contents) + ")", text)
        flags = {t.content: t for t in self._added.values()}
        for i in range(1, len(parts), 2):  # odd positions hold the added tokens
            token = flags[parts[i]]
            if token.rstrip and parts[i + 1]:
                parts[i + 1] = parts[i + 1].lstrip()
            if token.lstrip and parts[i - 1]:
                parts[i - 1] = parts[i - 1].rstrip()
        return [(part, i % 2 == 1) for i, part in enumerate(parts) if part]

    def _encode_piece(self, text: str) -> list[str]:
        pieces = self.sp_model.encode(text, out_type=str)
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return pieces
        # Without the dummy prefix SentencePiece drops a leading "▁"; 4.37 kept it by encoding "<unk>" + text and
        # cutting the pieces of "<unk>" off again.
        pieces = self.sp_model.encode(self.unk_token + text, out_type=str)
        return pieces[self._unk_length:] if len(pieces) >= self._unk_length else pieces

    def tokenize(self, text: str) -> list[str]:
        if not self.legacy and text:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        tokens = []
        for part, added in self._split_on_added(text):
            tokens.extend([part] if added else self._encode_piece(part))
        if not self.legacy and len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE \
                and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        if add_special_tokens:
            ids = ([self.bos_token_id] if self.add_bos_token else []) + ids + (
                [self.eos_token_id] if self.add_eos_token else [])
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> Encoding:
        if not isinstance(text, str):
            raise TypeError(f"SlowLlamaTokenizer encodes one string at a time, got {type(text).__name__}")
        return Encoding(self.encode(text, add_special_tokens))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text for display: SentencePiece pieces joined ("▁" as a space, the first one dropped), added tokens
        spelled out (4.37's spacing around special tokens is not reproduced)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        special = {self._token_to_id(t) for t in self.all_special_tokens}
        tokens = [self._added[i].content if i in self._added else self.sp_model.id_to_piece(i)
                  for i in ids if not (skip_special_tokens and i in special)]
        if tokens and tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]
        out, run = [], []
        for token in tokens:
            if token in self.added_tokens_encoder:
                out.append(self.sp_model.decode_pieces(run) if run else "")
                out.append(token)
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode_pieces(run) if run else "")
        return "".join(out)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
