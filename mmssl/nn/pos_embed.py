"""Position embeddings: learned tables (in the towers), fixed 2-D sin-cos, and rotary (1-D/2-D).

Rotary positions enter attention as relative offsets.  That alone does not make a ViT's
token grid shift-equivariant (under global attention every token sees the border); with a
local attention window as well (`VisionConfig.attn_window`) it is, away from the border.
"""

from __future__ import annotations

import torch
from torch import nn


def _sincos_1d(dim: int, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    omega = 1.0 / base ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = pos.double()[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding, MAE's construction but with the row in the first half of
    `dim` and the column in the second (MAE's code, through its meshgrid order, puts the
    column first).
    Returns (grid_h * grid_w, dim)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos needs dim divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, ys.flatten()), _sincos_1d(dim // 2, xs.flatten())], 1)
    return emb.float()


class RotaryEmbedding(nn.Module):
    """Rotary angles for a head dim.  `forward(positions)` returns (cos, sin) of shape
    (N, head_dim), or (B, N, head_dim) for per-row positions.

    positions: (N,) for 1-D text, or (B, N) per row (left-padded batches, whose rows start at
    different columns); or (N, 2) of (row, col) for 2-D grids (axes=2), in which case half of
    the rotated pairs encode the row and half the column (axial RoPE).
    """

    def __init__(self, head_dim: int, axes: int = 1, base: float = 10000.0):
        super().__init__()
        if head_dim % (2 * axes):
            raise ValueError(f"rotary head_dim {head_dim} must be divisible by {2 * axes}")
        self.axes = axes
        self.per_axis = head_dim // axes
        self.base = base

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (N,), (B, N) or (N, 2) -> (cos, sin), each (N, head_dim), or (B, N, head_dim)
        for (B, N) positions."""
        # The frequencies are made here in fp32, not kept as a buffer: `model.bfloat16()` (what
        # DeepSpeed's bf16 does) would round a buffer, and far positions would turn by other
        # angles in bf16 training than in the fp32 export (0.4 rad at position 1000).
        exponent = torch.arange(0, self.per_axis, 2, device=positions.device).float()
        inv_freq = 1.0 / self.base ** (exponent / self.per_axis)  # (per_axis/2,)
        if self.axes == 1:
            pos = positions.float()[..., None]  # (N, 1) or (B, N, 1)
        else:
            pos = positions.float().reshape(positions.shape[0], self.axes)  # (N, axes)
        angles = (pos[..., None] * inv_freq).flatten(-2)  # (..., N, head_dim/2)
        angles = torch.cat([angles, angles], dim=-1)  # (..., N, head_dim)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of the last dim.  x: (B, H, N, d); cos/sin: (N, d), or
    (B, N, d) for per-row positions.

    When x has more positions than the table (prefix tokens), the first extra ones are left
    unrotated: rotary covers the trailing N positions.
    """
    cos, sin = rope
    if cos.dim() == 3:  # per row: the same angles for every head
        cos, sin = cos[:, None], sin[:, None]
    n = cos.shape[-2]
    if n > x.shape[-2]:  # the slices below would wrap round and broadcast to n positions
        raise ValueError(f"rotary table has {n} positions, more than x's {x.shape[-2]}")
    head, tail = x[..., : x.shape[-2] - n, :], x[..., x.shape[-2] - n :, :]
    x1, x2 = tail.chunk(2, dim=-1)
    rotated = tail * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([head, rotated.to(x.dtype)], dim=-2) if head.shape[-2] else rotated.to(x.dtype)
