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

    Same maths as torchvision's `adjust_hue` (RGB -> HSV, h += shift mod 1, back), written
    with arithmetic only: on CPU, comparisons, bool masks and `where` cost 4-40x an add, so
    "channel c is the max" is `1 - sign(max - c)` and HSV -> RGB is a triangle wave of hue.
    """
    r, g, b = x.unbind(1)
    maxc = x.amax(1)  # (N, H, W)
    chroma = maxc - x.amin(1)
    dr, dg, db = maxc - r, maxc - g, maxc - b
    not_r = torch.sign(dr)  # 0 where red is the max: torchvision's tie order is r, g, b
    is_b = torch.sign(dg).mul_(not_r)
    # hue in sextants times chroma: (g-b), 2C+(b-r) or 4C+(r-g) when r, g or b is the max
    h_r = db - dg
    h_g = torch.sub(dr, db).add_(chroma, alpha=2.0)
    h_b = torch.sub(dg, dr).add_(chroma, alpha=4.0)
    h_b.sub_(h_g)
    h = h_r.addcmul_(not_r, h_g.sub_(h_r)).addcmul_(is_b, h_b)
    h.div_(chroma.clamp_min(1e-30)).add_(shift.view(-1, 1, 1), alpha=6.0)
    h.sub_(torch.floor(h * (1.0 / 6.0)), alpha=6.0)  # (N, H, W) in [0, 6)
    # channel = max - chroma * clamp(2 - d, 0, 1), d the distance of h from the channel's
    # opposite hue (3, 5, 1) on the 6-circle: 3 - ||u - 3| - 3| for u in [-3, 9]
    out = torch.empty_like(x)
    t = (h - 3.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    torch.addcmul(maxc, chroma, t, value=-1.0, out=out[:, 0])
    for c, centre in ((1, 5.0), (2, 1.0)):
        t = (h - centre).abs_().sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
        torch.addcmul(maxc, chroma, t, value=-1.0, out=out[:, c])
    return out
