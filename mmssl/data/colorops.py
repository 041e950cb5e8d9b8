"""Hue operations on batches: the exact HSV hue shift and its YIQ-rotation approximation."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)


def yiq_hue_matrix(shift: float | np.ndarray) -> np.ndarray:
    """RGB maps (3, 3) or (n, 3, 3) rotating chroma by `shift` of a full turn.

    Approximates an HSV hue shift; a negative angle in the I-Q plane moves red towards
    yellow, as a positive HSV shift does.
    """
    a = 2.0 * np.pi * np.asarray(shift, dtype=np.float64)
    cos, sin = np.cos(a), np.sin(a)
    rot = np.zeros(a.shape + (3, 3))
    rot[..., 0, 0] = 1.0
    rot[..., 1, 1] = rot[..., 2, 2] = cos
    rot[..., 1, 2] = sin
    rot[..., 2, 1] = -sin
    return _YIQ2RGB @ rot @ _RGB2YIQ


def hsv_shift(x: Tensor, shift: Tensor) -> Tensor:
    """Exact hue shift: x (N, 3, H, W) in [0, 1], shift (N,) fractions of a turn -> same shape.

    Same maths as torchvision's `adjust_hue` (RGB -> HSV, h += shift mod 1, back), in a
    closed form for HSV -> RGB that needs no six-way select.
    """
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    chroma = maxc - minc
    flat = chroma == 0
    safe = torch.where(flat, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    h = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), h) / 6.0
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0) * 6.0
    vs = chroma  # v * s
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h + n, 6.0)
        out.append(maxc - vs * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, dim=1)
