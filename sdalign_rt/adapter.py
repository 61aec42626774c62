"""BottleneckAdapter: maps drafter hidden states into the verifier's hidden space.

y = x + up(gelu(down(x))) when the two hidden sizes match (the residual makes a zero-initialised up
projection the identity: drafts start as the drafter's own view); y = up(gelu(down(x))) when they differ.
Inference runs the fused Triton/C++ op; training (autograd on) runs the reference composition.

Two options serve shallow drafting (draft_layers=k), where the input is a raw layer-k residual-stream state:
  input_norm:  x is first RMS-normalised with a learned scale (initialise it from the drafter's final norm), so
               the residual path starts from the state the drafter's own head would read, not from a raw
               residual stream of another scale;
  draft_vocab: the verifier token ids the draft head scores (EAGLE-3's reduced vocabulary): drafting multiplies
               by those rows of the verifier's LM head only. The verifier still checks every draft against its
               full head, so this changes which tokens can be drafted, never what is accepted.
"""
from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from sdalign_rt import ops, reference

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"


class BottleneckAdapter(nn.Module):
    """Maps drafter hidden states [..., hidden_size] to the verifier's [..., out_size] (same dtype as the input).

    Parameters
    ----------
    hidden_size : the drafter's hidden size D; bottleneck : R (256 gives ~2M parameters at D = 4096);
    out_size : the verifier's hidden size (default D: then y = x + up(gelu(down(x))), the identity at init).
    input_norm : a learned RMSNorm in front (shallow drafting: start it from the drafter's final norm).
    draft_vocab : [V'] int64 verifier token ids the drafts are scored over (EAGLE-3's reduced head), saved with it.
    context_size : condition on the verifier's final state at the previous position too (EAGLE's feature
        fusion): the bottleneck reads down(x) + context(c), c [..., context_size]; forward then needs `context`.

    Example
    -------
    >>> adapter = BottleneckAdapter(8, 4)
    >>> x = torch.randn(2, 3, 8)
    >>> torch.equal(adapter(x), x)  # the up-projection starts at zero
    True
    >>> adapter.draft_head(torch.randn(10, 8)).shape  # without a draft_vocab: every row of the LM head
    torch.Size([10, 8])
    """

    def __init__(self, hidden_size: int, bottleneck: int = 256, out_size: int | None = None, *,
                 input_norm: bool = False, norm_eps: float = 1e-5, draft_vocab: torch.Tensor | None = None,
                 context_size: int | None = None, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if hidden_size <= 0 or bottleneck <= 0:
            raise ValueError(f"hidden_size and bottleneck must be positive, got {hidden_size} and {bottleneck}")
        out_size = hidden_size if out_size is None else out_size
        self.hidden_size, self.bottleneck, self.out_size = hidden_size, bottleneck, out_size
        factory = {"dtype": dtype, "device": device}
        self.down = nn.Linear(hidden_size, bottleneck, **factory)
        self.up = nn.Linear(bottleneck, out_size, **factory)
        nn.init.normal_(self.down.weight, std=1.0 / math.sqrt(hidden_size))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # identity at init (with the residual)
        nn.init.zeros_(self.up.bias)
        self.norm_eps = norm_eps
        self.norm = nn.Parameter(torch.ones(hidden_size, **factory)) if input_norm else None
        self.context = None
        if context_size:
            self.context = nn.Linear(context_size, bottleneck, bias=False, **factory)
            nn.init.zeros_(self.context.weight)  # starts as the unconditioned adapter
        self.register_buffer("draft_vocab", None)
        if draft_vocab is not None:
            self.set_draft_vocab(draft_vocab)

    def set_draft_vocab(self, ids: torch.Tensor) -> None:
        ids = torch.as_tensor(ids)
        if ids.dim() != 1 or ids.numel() == 0 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"draft_vocab must be a non-empty 1-D tensor of token ids, got {tuple(ids.shape)} "
                             f"{ids.dtype}")
        if ids.unique().numel() != ids.numel() or bool((ids < 0).any()):
            raise ValueError("draft_vocab must hold distinct non-negative token ids")
        self.draft_vocab = ids.long().to(self.down.weight.device)

    @property
    def input_norm(self) -> bool:
        return self.norm is not None

    def draft_head(self, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """The rows of the verifier's LM head the drafts are scored with (all of them without a draft_vocab)."""
        if self.draft_vocab is None:
            return lm_head_weight
        if int(self.draft_vocab.max()) >= lm_head_weight.shape[0]:
            raise ValueError(f"the adapter's draft_vocab holds token id {int(self.draft_vocab.max())}, but the "
                             f"verifier's LM head has {lm_head_weight.shape[0]} tokens")
        return lm_head_weight[self.draft_vocab.to(lm_head_weight.device)]

    def normalize_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """The input norm (identity without one): what the down / up projections read. Callers that run the
        projections themselves (the fused adapter + cosine op) must apply it first."""
        if self.norm is None:
            return hidden
        x = hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        return (x * self.norm.float()).to(hidden.dtype)

    @property
    def residual(self) -> bool:
        return self.out_size == self.hidden_size

    @property
    def context_size(self) -> int | None:
        return None if self.context is None else self.context.in_features

    def forward(self, hidden: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [..., hidden_size] (and context [..., context_size] for a conditioned adapter) -> [..., out_size]."""
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"adapter expects hidden size {self.hidden_size}, got input of shape "
                             f"{tuple(hidden.shape)}")
        if (context is None) != (self.context is None):
            raise ValueError("this adapter is conditioned on the verifier's previous state: pass context "
                             f"[..., {self.context_size}]" if context is None else
                             "this adapter takes no context (it was built without context_size)")
        hidden = self.normalize_input(hidden)
        if context is not None or not self.residual or (
                torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())):
            return self._forward_autograd(hidden, context)
        return ops.fused_adapter(hidden, self.down.weight, self.down.bias, self.up.weight, self.up.bias)

    def forward_torch(self, hidden: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """forward in plain torch ops, without the fused op and without input checks: what a tracing compiler
        sees (vLLM compiles the draft model that calls this; sdalign_rt/vllm_plugin/draft_model.py)."""
        return self._forward_autograd(self.normalize_input(hidden), context)

    def _forward_autograd(self, hidden: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        compute = self.down.weight.dtype
        pre = self.down(hidden.to(compute))
        if context is not None:
            pre = pre + self.context(context.to(compute))
        y = self.up(reference.gelu_erf(pre))
        return (hidden.to(y.dtype) + y).to(hidden.dtype) if self.residual else y.to(hidden.dtype)

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "bottleneck": self.bottleneck, "out_size": self.out_size,
                "input_norm": self.input_norm, "norm_eps": self.norm_eps, "context_size": self.context_size,
                "draft_vocab_size": None if self.draft_vocab is None else int(self.draft_vocab.numel())}

    def save_pretrained(self, path: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(self.config(), f, indent=2)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  os.path.join(path, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype | None = None, device=None) -> "BottleneckAdapter":
        from safetensors.torch import load_file

        config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
        for needed in (config_path, weights_path):
            if not os.path.isfile(needed):
                raise FileNotFoundError(f"adapter directory {path!r} has no {os.path.basename(needed)}")
        with open(config_path) as f:
            config = json.load(f)
        weights = load_file(weights_path)
        adapter = cls(config["hidden_size"], config["bottleneck"], config.get("out_size"),
                      input_norm=config.get("input_norm", False), norm_eps=config.get("norm_eps", 1e-5),
                      draft_vocab=weights.get("draft_vocab"), context_size=config.get("context_size"))
        adapter.load_state_dict(weights)
        return adapter.to(device=device, dtype=dtype)
