"""BottleneckAdapter: identity at init, fused forward == autograd forward, save / load round trip."""
import pytest
import torch

import sdalign_rt as sd
from test_fused_adapter import TOLERANCE


def trained_like(adapter: sd.BottleneckAdapter, seed: int = 0) -> sd.BottleneckAdapter:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return adapter


def test_zero_init_is_identity(backend, device):
    adapter = sd.BottleneckAdapter(64, 16).to(device)
    x = torch.randn(2, 3, 64, device=device)
    with torch.no_grad():
        assert torch.equal(adapter(x), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_fused_forward_matches_autograd_forward(backend, device, dtype):
    adapter = trained_like(sd.BottleneckAdapter(96, 32)).to(device=device, dtype=dtype)
    x = torch.randn(4, 96, device=device).to(dtype)
    with torch.no_grad():
        fused = adapter(x)
    trained = adapter(x)  # autograd on: reference composition, differentiable
    assert trained.requires_grad
    torch.testing.assert_close(fused.float(), trained.detach().float(), **TOLERANCE[dtype])


def test_gradients_flow():
    adapter = trained_like(sd.BottleneckAdapter(32, 8))
    adapter(torch.randn(5, 32)).pow(2).sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in adapter.parameters())


def test_different_hidden_sizes_have_no_residual():
    adapter = trained_like(sd.BottleneckAdapter(48, 16, out_size=80))
    with torch.no_grad():
        y = adapter(torch.randn(3, 48))
    assert y.shape == (3, 80) and not adapter.residual


def test_save_and_load_round_trip(tmp_path):
    adapter = trained_like(sd.BottleneckAdapter(40, 8), seed=3)
    adapter.save_pretrained(str(tmp_path / "adapter"))
    loaded = sd.BottleneckAdapter.from_pretrained(str(tmp_path / "adapter"))
    assert loaded.config() == adapter.config()
    for a, b in zip(adapter.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_errors():
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        sd.BottleneckAdapter.from_pretrained("/nonexistent/adapter")
    with pytest.raises(ValueError, match="adapter expects hidden size 32"):
        sd.BottleneckAdapter(32, 8)(torch.zeros(2, 16))
    with pytest.raises(ValueError, match="must be positive"):
        sd.BottleneckAdapter(0, 8)


def test_draft_vocab_is_checked():
    adapter = sd.BottleneckAdapter(8, 4)
    with pytest.raises(ValueError, match="distinct non-negative"):
        adapter.set_draft_vocab(torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="1-D tensor of token ids"):
        adapter.set_draft_vocab(torch.tensor([[1, 2]]))
    adapter.set_draft_vocab(torch.tensor([3, 40]))
    with pytest.raises(ValueError, match="holds token id 40, but the verifier's LM head has 10 tokens"):
        adapter.draft_head(torch.zeros(10, 8))
