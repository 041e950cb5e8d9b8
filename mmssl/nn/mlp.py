"""Feed-forward layers: Mlp (GELU family) and SwiGLU."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU used by OpenAI's CLIP weights."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "relu": F.relu,
}


class Mlp(nn.Module):
    """fc1 -> activation -> fc2.  x: (..., D) -> (..., D)."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        self.act_name = act
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., D)."""
        return self.fc2(ACTIVATIONS[self.act_name](self.fc1(x)))


class SwiGLU(nn.Module):
    """silu(x W1) * (x W2) -> W3, with W1 and W2 fused into one matmul.  x: (..., D)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., D)."""
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * value)


def build_mlp(kind: str, dim: int, mlp_ratio: float, act: str, bias: bool) -> nn.Module:
    """`kind` is 'mlp' or 'swiglu'.  SwiGLU's hidden size is 2/3 of the ratio, so the
    parameter count matches an Mlp of the same ratio (as in LLaMA).  The width is rounded
    down with a 1e-6 margin: a ratio read off a model as hidden / dim gives back `hidden`
    (88 * (120 / 88) is 119.99999999999999 in floats)."""
    if kind == "mlp":
        return Mlp(dim, int(dim * mlp_ratio + 1e-6), act=act, bias=bias)
    if kind == "swiglu":
        return SwiGLU(dim, int(2 * dim * mlp_ratio / 3 + 1e-6), bias=bias)
    raise ValueError(f"mlp must be 'mlp' or 'swiglu', got {kind!r}")
