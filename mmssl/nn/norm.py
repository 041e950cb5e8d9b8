"""Normalisation: LayerNorm / RMSNorm, and the adaLN-Zero conditioned norm and gate.

Every norm takes `(x, cond=None)` so a Block can call `self.norm1(x, cond)` whether or not
it is conditioned.  The conditioned modules are zero-initialised in the sense that matters
for transfer: with their projections at zero they compute exactly the plain norm and a gate
of one, so a conditioned model starts equal to the unconditioned one (DESIGN.md), and
`cond=None` skips the modulation altogether.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dim; `cond` is accepted and ignored."""

    def __init__(self, dim: int, kind: str = "layernorm", eps: float = 1e-6, bias: bool = True):
        super().__init__()
        if kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")
        self.kind = kind
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias and kind == "layernorm" else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., D) -> normalised (..., D); `cond` is ignored."""
        if self.kind == "layernorm":
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class ConditionedNorm(Norm):
    """adaLN: `norm(x) * (1 + scale(c)) + shift(c)` with shift/scale a zero-init linear of SiLU(c).

    x: (B, N, D), cond: (B, C) or None.
    """

    def __init__(self, dim: int, cond_dim: int, kind: str = "layernorm", eps: float = 1e-6):
        super().__init__(dim, kind, eps)
        self.modulation = nn.Linear(cond_dim, 2 * dim)
        self.reset_conditioning()

    @torch.no_grad()
    def reset_conditioning(self) -> None:
        """Zero the modulation, so the norm equals the plain one."""
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D), cond (B, C) or None -> (B, N, D); cond=None gives the plain norm."""
        x = super().forward(x)
        if cond is None:
            return x
        _check_cond_rows(cond, x)
        shift, scale = self.modulation(F.silu(cond)).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D)
        return x * (1 + scale) + shift


class ConditionedGate(nn.Module):
    """adaLN-Zero-style gate on a residual branch: `y * (1 + gate(c))`, zero-init so the gate
    starts at 1.

    DiT's adaLN-Zero gates with alpha(c) itself, zero at init, so each block starts as the
    identity.  Here the gate is 1 + alpha(c): each block starts as the plain block, as
    DESIGN.md asks (a conditioned model equals the unconditioned one at init, so an
    unconditioned checkpoint loads and computes the same).

    y: (B, N, D), cond: (B, C) or None.
    """

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.gate = nn.Linear(cond_dim, dim)
        self.reset_conditioning()

    @torch.no_grad()
    def reset_conditioning(self) -> None:
        """Zero the gate's projection, so the gate is 1."""
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """y (B, N, D), cond (B, C) or None -> (B, N, D); cond=None returns y unchanged."""
        if cond is None:
            return y
        _check_cond_rows(cond, y)
        return y * (1 + self.gate(F.silu(cond)).unsqueeze(1))


def _check_cond_rows(cond: torch.Tensor, x: torch.Tensor) -> None:
    """cond (B or 1, C) for x (B, N, D): a 3-D cond broadcast the output to (B, B, N, D)."""
    if cond.dim() != 2 or cond.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"cond must be (B, C) or (1, C) for x {tuple(x.shape)}, got {tuple(cond.shape)}"
        )


class Ungated(nn.Module):
    """The gate of an unconditioned branch: returns `y` unchanged."""

    def forward(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """y (..., D), returned as it is; `cond` is ignored."""
        return y
