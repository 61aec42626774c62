"""Context lookup (prompt lookup decoding): ContextLookup against a plain-Python reference, the tree specs that
carry it, and decoding with it (greedy token-identical to target.generate; sample mode distributed as it)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

pytest.importorskip("transformers")

import sdalign_rt as sd  # noqa: E402
from sdalign_rt import reference as ref  # noqa: E402
from sdalign_rt.lookup import ContextLookup  # noqa: E402
from sdalign_rt.tree_plan import TreePlan  # noqa: E402
from sdalign_rt.trees import LOOKUP_RANK, TreeSpec  # noqa: E402

from test_decoder import DRAFTS, TARGET, VOCAB, homogeneity_p_value, left_padded_prompts, reference  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=24), min_size=1, max_size=3),
       proposals=st.integers(1, 4), max_ngram=st.integers(1, 3), data=st.data())
def test_propose_matches_reference(texts, proposals, max_ngram, data):
    """Small alphabets make matches of every length; texts arrive as a left-padded prompt and its root, then grow
    by append (as a decode step's commit extends them)."""
    min_ngram = data.draw(st.integers(1, max_ngram))
    split = [data.draw(st.integers(1, len(t))) for t in texts]  # prompt + root, then the rest appended
    prompts = [t[: n - 1] or [t[0]] for t, n in zip(texts, split)]
    roots = [t[n - 1] if n > 1 else t[0] for t, n in zip(texts, split)]
    starts = [p + [r] for p, r in zip(prompts, roots)]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(texts), width), 7, dtype=torch.long)  # 7: padding that must never be read
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    lookup = ContextLookup(len(texts), 64, proposals, "cpu", max_ngram=max_ngram, min_ngram=min_ngram)
    lookup.start(ids, mask, torch.tensor(roots))
    rest = [t[n:] for t, n in zip(texts, split)]
    grow = max(len(r) for r in rest)
    if grow:
        tokens = torch.full((len(texts), grow), 5, dtype=torch.long)
        for b, r in enumerate(rest):
            tokens[b, : len(r)] = torch.tensor(r, dtype=torch.long) if r else tokens[b, :0]
        lookup.append(tokens, torch.tensor([len(r) for r in rest]))
    full = [s + r for s, r in zip(starts, rest)]
    assert lookup.length.tolist() == [len(t) for t in full]
    got, matched = lookup.propose()
    for b, text in enumerate(full):
        want, n = ref.lookup_proposals(text, proposals, max_ngram, min_ngram)
        assert got[b].tolist() == want and int(matched[b]) == n, (text, want, n)


def test_a_text_past_the_buffer_keeps_its_first_tokens():
    lookup = ContextLookup(1, 8, 2, "cpu")
    lookup.start(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long), torch.tensor([4]))
    lookup.append(torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.tensor([6]))
    assert lookup.length.tolist() == [8] and lookup.text[0, :7].tolist() == [1, 2, 3, 4, 5, 6, 7]
    tokens, _ = lookup.propose()  # reads inside the buffer
    assert tokens.shape == (1, 2)


def test_reference_examples():
    assert ref.lookup_proposals([1, 2, 3, 9, 1, 2, 3], 2, 3, 1) == ([9, 1], 3)
    assert ref.lookup_proposals([1, 2, 1, 2, 1, 2], 3, 3, 1) == ([1, 2, 2], 3)  # the latest occurrence; the text ends
    assert ref.lookup_proposals([5, 6, 7], 2, 3, 1) == ([7, 7], 0)  # nothing occurred before: the last token


def test_specs_parse_print_and_refuse():
    for text in ["chain:1+lookup:3", "lookup:2", "static:[[0],[1],[0,0]]+lookup:2", "static:[[0]]+lookup-top:1",
                 "chain:3+lookup:2+lookup-top:2"]:
        assert str(TreeSpec.parse(text)) == text
    tree = TreeSpec.parse("static:[[0],[1],[0,0]]+lookup:2")
    assert tree.parents() == [-1, 0, 0, 1, 0, 4] and tree.ranks()[-2:] == [LOOKUP_RANK] * 2
    assert (tree.depth, tree.draft_depth, tree.num_nodes) == (2, 2, 6)
    plan = TreePlan.build(tree, "cpu", torch.float32)
    assert plan.lookup == (4, 6) and plan.leaves.tolist() == [2, 3, 4, 5]  # the drafter never runs lookup nodes
    assert plan.drafter_offsets.tolist() == [[0, 1, -1, -1, -1, -1]]
    with pytest.raises(ValueError, match="dynamic"):
        TreeSpec.dynamic(2, 2, 3).with_lookup(2)
    with pytest.raises(ValueError, match="top path"):
        TreeSpec.static([(1,)]).with_lookup_top(1)
    with pytest.raises(ValueError, match="lookup_top=2"):
        TreeSpec.chain(1).with_lookup_top(2)
    with pytest.raises(ValueError, match="lookup must be an int"):
        TreeSpec.chain(1).with_lookup(-1)


def repetitive_prompts(rows: int, seed: int):
    """Prompts that repeat a phrase, so the text's last tokens occur before and lookups propose."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(rows, 16, dtype=torch.long)
    for b in range(rows):
        phrase = torch.randint(1, VOCAB, (5,), generator=gen)
        ids[b] = torch.cat([phrase, phrase, phrase, phrase[:1]])
    return ids, torch.ones_like(ids)


TREES = ["lookup:3", "chain:1+lookup:3", "static:[[0],[1],[0,0]]+lookup:2", "static:[[0]]+lookup-top:1",
         "chain:3+lookup-top:2", "chain:2+lookup:2+lookup-top:1"]


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("lean", [True, False])
def test_greedy_with_lookup_equals_target_generate(tree, lean):
    """Self-speculative (the verifier's first layer, the shared cache and, when lean, layer reuse) and, for lookup
    in place, a drafter with its own cache too."""
    spec = TreeSpec.parse(tree)
    for ids, mask in (repetitive_prompts(2, 0), left_padded_prompts([4, 9, 2], 3)):
        expected = reference(ids, mask, 30)
        if spec.draft_depth == 0:
            decoder = sd.SpeculativeDecoder(TARGET, None, tree=spec, lean=lean)
        else:
            adapter = sd.BottleneckAdapter(64, 16)
            torch.nn.init.normal_(adapter.up.weight, std=0.02)
            decoder = sd.SpeculativeDecoder(TARGET, TARGET, adapter=adapter, draft_layers=1, tree=spec, lean=lean)
        out = decoder.generate(ids, 30, attention_mask=mask)
        assert torch.equal(out.sequences, expected), tree
        if spec.lookup_top and not spec.lookup:
            own = sd.SpeculativeDecoder(TARGET, DRAFTS["perturbed"], tree=spec, lean=lean)
            assert torch.equal(own.generate(ids, 30, attention_mask=mask).sequences, expected), tree


@pytest.mark.parametrize("tree", ["lookup:3", "static:[[0]]+lookup-top:1"])
def test_lookup_drafts_land_on_repetitive_text(tree):
    """A random model's greedy text loops: copied drafts must be accepted (reported under rank "lookup")."""
    ids, mask = repetitive_prompts(2, 1)
    spec = TreeSpec.parse(tree)
    draft = None if spec.draft_depth == 0 else DRAFTS["unrelated"]
    out = sd.SpeculativeDecoder(TARGET, draft, tree=spec).generate(ids, 40, attention_mask=mask)
    assert torch.equal(out.sequences, reference(ids, mask, 40))
    landed = out.stats["accepted_by_depth_rank"][0].get("lookup", 0)
    assert landed >= 0.3 * out.stats["row_steps"], out.stats["accepted_by_depth_rank"]
    assert out.stats["mean_accepted"] > 1.3


def test_sample_mode_with_lookup_matches_target_sampling():
    rows, new = 3000, 4
    ids = repetitive_prompts(1, 2)[0].expand(rows, -1)
    decoder = sd.SpeculativeDecoder(TARGET, DRAFTS["perturbed"], mode="sample", tree=TreeSpec.parse(
        "chain:2+lookup-top:1"))
    out = decoder.generate(ids, new, generator=torch.Generator().manual_seed(3), temperature=0.9)
    assert 0.02 < out.stats["acceptance_rate"] < 0.98
    ours = out.sequences[:, ids.shape[1]:]
    torch.manual_seed(4)
    theirs = TARGET.generate(ids, max_new_tokens=new, do_sample=True, temperature=0.9, top_k=0)[:, ids.shape[1]:]
    for position in range(new):
        assert homogeneity_p_value(ours[:, position], theirs[:, position]) > 1e-4, position


def test_refusals():
    with pytest.raises(ValueError, match="feature mode"):
        sd.SpeculativeDecoder(TARGET, DRAFTS["perturbed"], mode="feature", tree=TreeSpec.parse("chain:2+lookup-top:1"))
    with pytest.raises(ValueError, match="cache of its own"):
        sd.SpeculativeDecoder(TARGET, DRAFTS["perturbed"], tree=TreeSpec.parse("chain:2+lookup:2"))
    with pytest.raises(ValueError, match="drafted tree"):
        sd.SpeculativeDecoder(TARGET, None, tree=TreeSpec.chain(2))
