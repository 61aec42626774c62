"""VocabMap: token ids between a drafter's and a verifier's vocabularies.

The committed text is in the verifier's ids; the drafter reads it through `to_draft`, and plain drafts
(the drafter's own LM head) are lifted into the verifier's ids through `to_target`. Tokens a side lacks map
to -1: the drafter reads its `unknown_id` there, and the verifier never sees such a draft. Built from the two
tokenizers' vocabularies, it refuses pairs that disagree on ids both have (EventGPT's LLaMA tokenizer plus
event tokens vs Video-LLaVA's 32064: the LLaMA tokens must keep their ids; the added tokens may differ).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VocabMap:
    to_draft: torch.Tensor  # [V_target] drafter id of each verifier id, -1 where the drafter lacks it
    to_target: torch.Tensor  # [V_draft] verifier id of each drafter id, -1 where the verifier lacks it
    unknown_id: int = 0

    @classmethod
    def from_vocabularies(cls, draft_vocab: dict[str, int], target_vocab: dict[str, int], draft_size: int,
                          target_size: int, unknown_id: int = 0, check_shared: bool = True) -> "VocabMap":
        """Map by token string. check_shared: a token both vocabularies hold must have one id in both (tokens only
        one side has, like EventGPT's event tokens and Video-LLaVA's <video>, may reuse each other's ids)."""
        if check_shared:
            disagree = sorted(t for t in draft_vocab.keys() & target_vocab.keys() if draft_vocab[t] != target_vocab[t])
            if disagree:
                t = disagree[0]
                raise ValueError(f"the vocabularies disagree on {len(disagree)} shared tokens (e.g. {t!r}: drafter id "
                                 f"{draft_vocab[t]}, verifier id {target_vocab[t]}); they cannot be paired")
        to_draft = torch.full((target_size,), -1, dtype=torch.long)
        to_target = torch.full((draft_size,), -1, dtype=torch.long)
        for token, i in target_vocab.items():
            j = draft_vocab.get(token)
            if j is not None and i < target_size and j < draft_size:
                to_draft[i] = j
                to_target[j] = i
        return cls(to_draft, to_target, unknown_id)

    @classmethod
    def from_tokenizers(cls, draft_tokenizer, target_tokenizer, draft_size: int | None = None,
                        target_size: int | None = None) -> "VocabMap":
        """draft_size / target_size: the models' embedding rows (padded vocabularies are larger)."""
        draft_vocab, target_vocab = draft_tokenizer.get_vocab(), target_tokenizer.get_vocab()
        return cls.from_vocabularies(draft_vocab, target_vocab, draft_size or len(draft_vocab),
                                     target_size or len(target_vocab),
                                     unknown_id=draft_tokenizer.unk_token_id or 0)

    def to(self, device) -> "VocabMap":
        return VocabMap(self.to_draft.to(device), self.to_target.to(device), self.unknown_id)

    def draft_ids(self, target_ids: torch.Tensor) -> torch.Tensor:
        mapped = self.to_draft[target_ids]
        return torch.where(mapped >= 0, mapped, self.unknown_id)

    def target_scores(self, draft_scores: torch.Tensor, target_size: int) -> torch.Tensor:
        """Drafter scores [..., V_draft] as verifier-vocabulary scores [..., V_target] (-inf where unmapped)."""
        out = draft_scores.new_full((*draft_scores.shape[:-1], target_size), float("-inf"))
        keep = self.to_target >= 0
        out[..., self.to_target[keep]] = draft_scores[..., keep]
        return out
