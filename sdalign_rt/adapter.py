"""BottleneckAdapter: maps drafter hidden states into the verifier's hidden space.

y = x + up(gelu(down(x))) when the two hidden sizes match (the residual makes a zero-initialised up
projection the identity: drafts start as the drafter's own view); y = up(gelu(down(x))) when they differ.
Inference runs the fused Triton/C++ op; training (autograd on) runs the reference composition.
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
    def __init__(self, hidden_size: int, bottleneck: int = 256, out_size: int | None = None, *,
                 dtype: torch.dtype | None = None, device=None):
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

    @property
    def residual(self) -> bool:
        return self.out_size == self.hidden_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"adapter expects hidden size {self.hidden_size}, got input of shape "
                             f"{tuple(hidden.shape)}")
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return self._forward_autograd(hidden)
        if self.residual:
            return ops.fused_adapter(hidden, self.down.weight, self.down.bias, self.up.weight, self.up.bias)
        return self._forward_autograd(hidden)

    def _forward_autograd(self, hidden: torch.Tensor) -> torch.Tensor:
        compute = self.down.weight.dtype
        h = reference.gelu_erf(self.down(hidden.to(compute)))
        y = self.up(h)
        return (hidden.to(y.dtype) + y).to(hidden.dtype) if self.residual else y.to(hidden.dtype)

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "bottleneck": self.bottleneck, "out_size": self.out_size}

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
        adapter = cls(config["hidden_size"], config["bottleneck"], config.get("out_size"))
        adapter.load_state_dict(load_file(weights_path))
        return adapter.to(device=device, dtype=dtype)
