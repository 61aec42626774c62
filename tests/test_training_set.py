"""The self-instruct generator of the embedded default's training conversations: cleaning, list items,
de-duplication and decontamination, and a whole build on a tiny model (resumable from its per-batch work)."""
import json

import pytest

pytest.importorskip("transformers")
from sdalign_rt.demo import training_set as ts  # noqa: E402


def test_items_keep_complete_numbered_requests_only():
    completion = (" How do I water a cactus?\n5. Write a poem about trains and stations.\n6. Tell me why the"
                  " sky is")
    assert ts._items(completion) == ["How do I water a cactus?", "Write a poem about trains and stations."]
    assert ts._items(" How do I fix it?\nThe answer is that you cannot.\n5. What is two and two?\n") == [
        "How do I fix it?"]  # the list ended: an answer follows, nothing after it counts
    assert ts._items(" cut off mid") == []


@pytest.mark.parametrize("text", ["ok", "1234 is a number, right?", "Answer: the capital is Paris.",
                                  "see http://example.com for the details please.", "aaaaaaah what is this?",
                                  "A request without an ending mark"])
def test_clean_drops_junk(text):
    assert ts._clean(text) is None


def test_dedup_drops_equal_near_and_contaminated_texts():
    dedup = ts.Dedup(["Translate into Spanish: the museum is closed on Mondays, but it opens early on Saturdays."])
    assert dedup.add("How do I keep basil alive on a windowsill?")
    assert not dedup.add("how do I keep basil  alive on a windowsill?")  # equal up to case and spacing
    assert not dedup.add("How do I keep basil alive on a sunny windowsill?")  # most 3-grams shared
    assert dedup.add("What is the best soil for growing tomatoes in pots?")
    assert not dedup.add("Please: the museum is closed on Mondays, but it opens early on Sundays.")  # 8-gram
    assert dedup.add("Is the museum closed on Mondays?")  # shares words, not an 8-gram


def test_build_on_a_tiny_model_resumes_from_its_work(tmp_path, monkeypatch):
    from test_cli_generate import word_tokenizer
    from test_decoder import tiny_llama

    model, tokenizer = tiny_llama(0, layers=2), word_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}w3{% endif %}")
    # the tiny model writes words, not requests: every third completion is made a clean list item
    real = ts._items
    monkeypatch.setattr(ts, "_items", lambda completion: real(completion) or (
        [f"Request number {len(completion)} about w{completion.count(' ')}?"]))
    sizes = dict(requests=12, passages=6, multi_turn=4, arithmetic=5, snippets=6, batch_size=8)
    first = ts.build_training_set(model, tokenizer, str(tmp_path), progress=False, **sizes)
    kinds = first["kinds"]
    assert kinds["arithmetic"] >= 3 and 1 <= kinds["code_snippet"] <= 6 and "question" in kinds
    assert sum(len(c["messages"]) == 3 for c in first["conversations"]) == kinds.get("multi_turn", 0)
    assert (tmp_path / "requests.jsonl").exists() and (tmp_path / "passages.jsonl").exists()

    def never(*args, **kwargs):
        raise AssertionError("a finished build generates nothing again")

    monkeypatch.setattr(model, "generate", never)
    again = ts.build_training_set(model, tokenizer, str(tmp_path), progress=False, **sizes)
    assert json.dumps(again) == json.dumps(first)
