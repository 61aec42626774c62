"""verify_tree_sampling: equality with the reference on shared uniforms, reduction to greedy on one-hot
targets, and losslessness: the emitted tokens follow the verifier's distribution (chi-square tests)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import sdalign_rt as sd
from sdalign_rt import reference
from strategies import make_parents, paths_of, planted_tokens, trees

# Statistical tests: fixed seeds, chi-square goodness of fit per conditional distribution, each must have
# p-value > P_MIN. With fixed seeds the outcome is deterministic; a lossy rule (e.g. accepting a draft
# with probability 1, or sampling the bonus from the unmodified distribution) gives p-values ~ 0.
P_MIN = 1e-4


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed counts against probabilities (categories of zero probability must be empty)."""
    assert int(counts[probs == 0].sum()) == 0, "a zero-probability token was emitted"
    keep = probs > 0
    total = counts.sum()
    expected = probs[keep] / probs[keep].sum() * total
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat.double() / 2))


def emitted_sequences(draft, parents, out):
    """Per row, the tokens one step emits: accepted drafts below the root, then the bonus token."""
    nodes, length, bonus = (t.cpu() for t in out)
    return [tuple(int(draft[b, i]) for i in nodes[b, 1:int(length[b])].tolist()) + (int(bonus[b]),)
            for b in range(nodes.shape[0])]


# Root 0 drafts children 1, 2, 3 with tokens 1, 1 (a duplicate sibling), 2; node 1 has children 4, 5;
# the duplicate 2 has a child 6 that can never be reached; node 4 has child 7.
TREE_PARENTS = [-1, 0, 0, 0, 1, 1, 2, 4]
TREE_TOKENS = [0, 1, 1, 2, 0, 3, 4, 5]


def tree_case(vocab: int, samples: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand(len(TREE_PARENTS), vocab, generator=gen) + 0.05
    probs[:, 4] = 0.0  # a token the verifier never emits (only the unreachable node 6 drafts it)
    probs[2] *= 3.0  # unnormalised rows are fine
    parents = torch.tensor(TREE_PARENTS).expand(samples, -1).contiguous()
    tokens = torch.tensor(TREE_TOKENS).expand(samples, -1).contiguous()
    return tokens, parents, probs.expand(samples, -1, -1).contiguous(), probs


@pytest.mark.parametrize("backend_name,samples", [("reference", 100000), ("cpp", 400000)])
def test_output_distribution_equals_verifier(backend_name, samples):
    if backend_name not in sd.ops.available_backends("cpu"):
        pytest.skip(f"{backend_name} backend not built")
    vocab = 6
    tokens, parents, batch_probs, probs = tree_case(vocab, samples, seed=1)
    with sd.ops.use_backend(backend_name):
        out = sd.ops.verify_tree_sampling(tokens, parents, batch_probs, generator=torch.Generator().manual_seed(2))
    sequences = emitted_sequences(tokens, parents, out)
    # Each emitted token, given the tokens before it in the step, must follow the verifier's distribution at
    # the node those tokens lead to: p[0] first; after token 1 (node 1), p[1]; after (1, 0) (node 4), p[4]; ...
    conditionals = {(): 0, (1,): 1, (2,): 3, (1, 0): 4, (1, 3): 5, (1, 0, 5): 7}
    for prefix, node in conditionals.items():
        nxt = torch.tensor([s[len(prefix)] for s in sequences if s[:len(prefix)] == prefix and len(s) > len(prefix)])
        assert nxt.numel() > 300, f"too few samples after {prefix}"
        counts = torch.bincount(nxt, minlength=vocab).double()
        p_value = chi_square_p_value(counts, probs[node].double())
        assert p_value > P_MIN, f"after {prefix}: counts {counts.tolist()} vs p[{node}] (p-value {p_value:.2e})"
    # The duplicate sibling (node 2) and its subtree are never accepted.
    assert not bool((out[0] == 2).any()) and not bool((out[0] == 6).any())


def test_lossy_rule_is_caught():
    """The chi-square check has power: sampling the bonus from p without removing rejected tokens fails it."""
    vocab = 6
    tokens, parents, batch_probs, probs = tree_case(vocab, 40000, seed=1)
    out = reference.verify_tree_sampling(tokens, parents, batch_probs, torch.rand(40000, 8, generator=torch.Generator().manual_seed(3)))
    nodes, length, _ = out
    gen = torch.Generator().manual_seed(4)
    wrong_bonus = torch.multinomial(probs[nodes[torch.arange(40000), length - 1]], 1, generator=gen).flatten()
    sequences = emitted_sequences(tokens, parents, (nodes, length, wrong_bonus))
    first = torch.bincount(torch.tensor([s[0] for s in sequences]), minlength=vocab).double()
    assert chi_square_p_value(first, probs[0].double()) < 1e-10


@pytest.mark.parametrize("depth", [1, 4])
def test_chain_distribution(depth):
    """Chains (the Leviathan case): first and second emitted tokens follow p[0] and p[1]."""
    if "cpp" not in sd.ops.available_backends("cpu"):
        pytest.skip("cpp backend not built")
    vocab, samples = 5, 100000
    gen = torch.Generator().manual_seed(depth)
    probs = torch.rand(depth + 1, vocab, generator=gen) ** 2 + 0.02
    parents = torch.arange(-1, depth).expand(samples, -1).contiguous()
    tokens = torch.tensor([0] + [int(torch.argmax(probs[i])) for i in range(depth)]).expand(samples, -1).contiguous()
    with sd.ops.use_backend("cpp"):
        out = sd.ops.verify_tree_sampling(tokens, parents, probs.expand(samples, -1, -1).contiguous(),
                                          generator=torch.Generator().manual_seed(9))
    sequences = emitted_sequences(tokens, parents, out)
    first = torch.bincount(torch.tensor([s[0] for s in sequences]), minlength=vocab).double()
    assert chi_square_p_value(first, probs[0].double()) > P_MIN
    prefix = (int(tokens[0, 1]),)
    second = torch.tensor([s[1] for s in sequences if s[:1] == prefix and len(s) > 1])
    counts = torch.bincount(second, minlength=vocab).double()
    assert chi_square_p_value(counts, probs[1].double()) > P_MIN


@settings(max_examples=8)
@given(parents=trees(max_nodes=24, max_batch=3), vocab=st.sampled_from([3, 7, 300]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_matches_reference(backend, device, parents, vocab, seed, dtype):
    """Same uniforms, same tokens: every backend makes the reference's decisions."""
    batch, n = parents.shape
    gen = torch.Generator().manual_seed(seed)
    draft, _ = planted_tokens(parents, vocab, 0.0, seed)
    probs = (torch.rand(batch, n, vocab, generator=gen) ** 4).to(dtype)
    for b in range(batch):  # make drafts likely so that paths go deep
        probs[b, parents[b].long().clamp(min=0)[1:], draft[b, 1:]] += 2.0
    uniform = torch.rand(batch, n, generator=gen)
    out = sd.ops.verify_tree_sampling(draft.to(device), parents.to(device), probs.to(device), uniform.to(device))
    for got, want in zip(out, reference.verify_tree_sampling(draft, parents, probs, uniform)):
        assert torch.equal(got.cpu(), want)
    nodes, length, _ = out
    for b, row in enumerate(parents.long().tolist()):  # accepted path is a root-to-node path
        path = nodes[b, : int(length[b])].tolist()
        assert path == paths_of(row, path[-1])


def distinct_siblings(draft: torch.Tensor, parents: torch.Tensor, vocab: int) -> torch.Tensor:
    """Re-token later siblings that repeat an earlier sibling's token (top-k drafts never repeat)."""
    draft = draft.clone()
    for b, row in enumerate(parents.long().tolist()):
        seen: dict[int, set] = {}
        for i in range(1, len(row)):
            used = seen.setdefault(row[i], set())
            while int(draft[b, i]) in used:
                draft[b, i] = (int(draft[b, i]) + 1) % vocab
            used.add(int(draft[b, i]))
    return draft


@settings(max_examples=8)
@given(parents=trees(max_nodes=40, max_batch=3), seed=st.integers(0, 2**16))
def test_one_hot_targets_reduce_to_greedy(backend, device, parents, seed):
    """With the verifier's distribution a point mass at its argmax and distinct sibling drafts (as top-k
    drafting makes them), sampling verification is greedy verification."""
    vocab = 64
    draft, argmax = planted_tokens(parents, vocab, 0.7, seed)
    draft = distinct_siblings(draft, parents, vocab)
    probs = torch.nn.functional.one_hot(argmax, vocab).float()
    uniform = torch.rand(parents.shape, generator=torch.Generator().manual_seed(seed))
    out = sd.ops.verify_tree_sampling(draft.to(device), parents.to(device), probs.to(device), uniform.to(device))
    for got, want in zip(out, reference.verify_tree_greedy(draft, parents, argmax)):
        assert torch.equal(got.cpu(), want)


def test_triton_draws_match_cpp_on_the_statistical_case(device):
    """The statistical test runs on the reference and C++; the kernel makes the same decisions on the same draws."""
    if "triton" not in sd.ops.available_backends(device):
        pytest.skip("triton backend not available")
    tokens, parents, batch_probs, _ = tree_case(6, 96, seed=1)
    uniform = torch.rand(96, 8, generator=torch.Generator().manual_seed(5))
    with sd.ops.use_backend("triton"):
        out = sd.ops.verify_tree_sampling(tokens.to(device), parents.to(device), batch_probs.to(device), uniform.to(device))
    for got, want in zip(out, reference.verify_tree_sampling(tokens, parents, batch_probs, uniform)):
        assert torch.equal(got.cpu(), want)


def test_generator_makes_draws_reproducible(backend, device):
    tokens, parents, batch_probs, _ = tree_case(6, 4, seed=1)
    args = (tokens.to(device), parents.to(device), batch_probs.to(device))
    first = sd.ops.verify_tree_sampling(*args, generator=torch.Generator(device).manual_seed(7))
    second = sd.ops.verify_tree_sampling(*args, generator=torch.Generator(device).manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("change,message", [
    (lambda t, p, q, u: (t, p, q[:, :-1], u), r"target_probs must have shape \(2, 3, V\)"),
    (lambda t, p, q, u: (t, p, -q, u), "target_probs must be non-negative"),
    (lambda t, p, q, u: (t, p, q * 0, u), "sums to 0"),
    (lambda t, p, q, u: (t, p, q.masked_fill(q > 0.5, float("nan")), u), "target_probs contains non-finite"),
    (lambda t, p, q, u: (t + 5, p, q, u), r"draft_tokens must hold token ids in \[0, 4\)"),
    (lambda t, p, q, u: (t, p, q, u + 1), r"uniform must hold values in \[0, 1\)"),
    (lambda t, p, q, u: (t, p, q, u[:, :2]), r"uniform must have shape \(2, 3\)"),
    (lambda t, p, q, u: (t, p.flip(1), q, u), "parents is not a tree"),
])
def test_bad_input(change, message):
    tokens = torch.tensor([[0, 1, 2], [0, 3, 3]])
    parents = torch.tensor([[-1, 0, 0], [-1, 0, 1]])
    probs = torch.rand(2, 3, 4) + 0.1
    uniform = torch.rand(2, 3)
    with pytest.raises(ValueError, match=message):
        sd.ops.verify_tree_sampling(*change(tokens, parents, probs, uniform))


@pytest.mark.parametrize("fill", [float("nan"), 0.0])
def test_degenerate_rows_never_give_a_negative_token(backend, device, fill):
    """A nan (or all-zero) distribution, as a broken model produces, with value checks off as in the decoding
    loop: every backend still returns a valid token id (the loop reports the non-finite logits itself)."""
    parents = torch.tensor([[-1, 0, 1], [-1, 0, 0]], device=device)
    draft = torch.tensor([[0, 3, 4], [0, 1, 2]], device=device)
    probs = torch.full((2, 3, 6), fill, device=device)
    with sd.ops.value_checks(False):
        accept_nodes, accept_len, bonus = sd.ops.verify_tree_sampling(draft, parents, probs,
                                                                      torch.full((2, 3), 0.5, device=device))
    assert bonus.tolist() == [0, 0] and accept_len.tolist() == [1, 1]
