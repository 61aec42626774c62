"""VocabMap and decoding across two vocabularies."""
import pytest
import torch

pytest.importorskip("transformers")

import sdalign_rt as sd  # noqa: E402
from test_decoder import TARGET, TREES, VOCAB, left_padded_prompts, perturbed, reference, tiny_llama  # noqa: E402


def names(size, order=None):
    order = list(range(size)) if order is None else order
    return {f"tok{i}": order[i] for i in range(size)}


def test_shared_ids_must_agree():
    draft = {"<unk>": 0, "a": 1, "b": 2}
    target = {"<unk>": 0, "b": 1, "a": 2, "c": 3}
    with pytest.raises(ValueError, match="disagree on 2 shared tokens"):
        sd.VocabMap.from_vocabularies(draft, target, 3, 4)
    mapping = sd.VocabMap.from_vocabularies(draft, target, 3, 4, check_shared=False)
    assert mapping.to_draft.tolist() == [0, 2, 1, -1] and mapping.to_target.tolist() == [0, 2, 1]
    assert mapping.draft_ids(torch.tensor([3, 1])).tolist() == [0, 2]  # unmapped -> unknown id
    scores = mapping.target_scores(torch.tensor([[0.5, 1.0, 2.0]]), 4)
    assert scores[0, :3].tolist() == [0.5, 2.0, 1.0] and scores[0, 3] == float("-inf")


def test_added_tokens_may_share_ids():
    """Each side's own added tokens on the same ids (event tokens vs <image>/<video>) are not a conflict."""
    base = {"<unk>": 0, "a": 1, "b": 2}
    mapping = sd.VocabMap.from_vocabularies({**base, "<ev_start>": 3, "<ev_end>": 4}, {**base, "<image>": 3,
                                            "<video>": 4}, 5, 6)
    assert mapping.to_draft.tolist() == [0, 1, 2, -1, -1, -1] and mapping.to_target.tolist() == [0, 1, 2, -1, -1]


@pytest.mark.parametrize("tree", ["chain4", "dynamic"])
def test_smaller_drafter_vocabulary(tree):
    """A drafter that knows only the first 80 of the verifier's 96 ids: refused without a map, lossless with."""
    draft = tiny_llama(5, vocab=80)
    with pytest.raises(ValueError, match="vocab mismatch"):
        sd.SpeculativeDecoder(target=TARGET, draft=draft)
    mapping = sd.VocabMap.from_vocabularies(names(80), names(VOCAB), 80, VOCAB)
    ids, mask = left_padded_prompts([5, 8], 6)
    out = sd.SpeculativeDecoder(target=TARGET, draft=draft, tree=TREES[tree], vocab_map=mapping).generate(
        ids, 16, attention_mask=mask)
    assert torch.equal(out.sequences, reference(ids, mask, 16))


def test_permuted_vocabulary_round_trips():
    """The verifier with its token rows permuted: through the map it drafts the verifier's own tokens."""
    perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))
    draft = perturbed(TARGET, 0.0, 0)
    with torch.no_grad():
        draft.model.embed_tokens.weight[perm] = TARGET.model.embed_tokens.weight.clone()
        draft.lm_head.weight[perm] = TARGET.lm_head.weight.clone()
    mapping = sd.VocabMap.from_vocabularies(names(VOCAB, perm.tolist()), names(VOCAB), VOCAB, VOCAB,
                                            check_shared=False)
    ids, mask = left_padded_prompts([4, 6], 7)
    spec = TREES["chain4"]
    out = sd.SpeculativeDecoder(target=TARGET, draft=draft, tree=spec, vocab_map=mapping).generate(
        ids, 1 + 2 * (spec.depth + 1), attention_mask=mask)
    assert torch.equal(out.sequences, reference(ids, mask, 1 + 2 * (spec.depth + 1)))
    assert out.stats["mean_accepted"] == spec.depth + 1


def test_map_sizes_are_checked():
    with pytest.raises(ValueError, match="vocab_map covers 10 verifier / 10 drafter ids"):
        sd.SpeculativeDecoder(target=TARGET, draft=TARGET,
                              vocab_map=sd.VocabMap.from_vocabularies(names(10), names(10), 10, 10))
