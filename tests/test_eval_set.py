"""The frozen evaluation set stays apart from training: no training prompt, calibration prompt or template text
appears in it, every kind users ask for is there, and it parses as chat messages."""
import re

from sdalign_rt.demo import prompts

KINDS = {"code", "arithmetic", "rewriting", "translation", "summary", "troubleshooting", "letter", "question",
         "instruction", "multi_turn", "long_input"}


def user_texts(entry) -> list[str]:
    return [m["content"] for m in entry["messages"] if m["role"] == "user"]


def test_shape_and_kinds():
    entries = prompts.frozen_eval_set()
    assert len(entries) >= 40
    kinds = [e["kind"] for e in entries]
    assert set(kinds) == KINDS and all(kinds.count(k) >= 3 for k in KINDS)
    for entry in entries:
        roles = [m["role"] for m in entry["messages"]]
        assert roles[0] == "user" and roles[-1] == "user" and all(r in ("user", "assistant") for r in roles)
        assert all(m["content"].strip() for m in entry["messages"])
    assert any(len(e["messages"]) >= 3 for e in entries)  # multi-turn
    assert any(len(user_texts(e)[0]) > 500 for e in entries)  # long inputs
    texts = [t for e in entries for t in user_texts(e)]
    assert len(texts) == len(set(texts))


def test_nothing_of_training_appears():
    """No training or calibration prompt equals an evaluation turn, and no template's fixed wording (the text around
    {topic}) occurs in one: a generator of training prompts must keep this test green."""
    evaluation = [t.lower() for e in prompts.frozen_eval_set() for t in user_texts(e)]
    seen = {p.lower() for p in prompts.train_prompts() + prompts.calibration_prompts()}
    assert not seen.intersection(evaluation)
    for template in prompts.TEMPLATES:
        for fragment in (part.strip().lower() for part in re.split(r"\{topic\}", template)):
            if len(fragment) >= 12:
                assert not any(fragment in text for text in evaluation), (template, fragment)


def test_the_generated_training_set_stays_apart_from_the_evaluation_set():
    """The committed, model-written training conversations: many kinds, no user turn equal to an evaluation turn,
    no word 8-gram shared with one (the generator's decontamination, checked on what was committed)."""
    from sdalign_rt.demo import training_set

    entries = training_set.shipped_training_set()
    assert len(entries) >= 1500
    kinds = {e["kind"] for e in entries}
    assert {"question", "instruction", "code", "arithmetic", "troubleshooting", "letter", "given_text",
            "long_input", "multi_turn", "code_snippet"} <= kinds
    evaluation = [t for e in prompts.frozen_eval_set() for t in user_texts(e)]
    banned = set().union(*(training_set.shingles(t, 8) for t in evaluation))
    normalised = {" ".join(t.lower().split()) for t in evaluation}
    for entry in entries:
        for text in user_texts(entry):
            assert " ".join(text.lower().split()) not in normalised, text
            assert not training_set.shingles(text, 8) & banned, text
    assert any(len(e["messages"]) == 3 and e["messages"][1]["role"] == "assistant" for e in entries)
    assert sum(len(user_texts(e)[0]) > 1000 for e in entries) >= 20  # long inputs
