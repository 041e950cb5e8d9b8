"""Colour jitter maths on batches of views: the fused affine maps, the exact HSV hue shift
and its YIQ-rotation approximation.

`apply_color` is the torch implementation, and the reference of the compiled one in
`mmssl.data.fastviews`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from mmssl.data.augment import ViewParams

_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)
_GRAY = np.array([0.299, 0.587, 0.114])
_TO_GRAY = np.outer(np.ones(3), _GRAY)  # x -> gray(x) in every channel


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


def _compose(
    order: np.ndarray, f: np.ndarray, mean: np.ndarray, active: np.ndarray, hue_mode: str
) -> np.ndarray:
    """(n, 3, 4) affine maps [M | c] of the active jitter steps, composed in `order`.

    order (n, 4) op per step (0 brightness, 1 contrast, 2 saturation, 3 hue), f (n, 4)
    factors by op, mean (n, 3) channel means of the input, active (n, 4) by step.
    Closed form instead of a product over steps: brightness and contrast scale by a
    scalar, saturation blends with grey and the YIQ hue turns chroma, so the linear parts
    commute; saturation, hue and contrast keep the grey mean, so the mean contrast blends
    towards is the input's times the brightness factor if brightness ran first, and the
    constant it adds is scaled by brightness if that runs later.
    """
    step = np.argsort(order, axis=1)  # (n, 4) step of each op
    on = np.take_along_axis(active, step, axis=1)  # (n, 4) by op
    fb, fc, fs = (np.where(on[:, k], f[:, k], 1.0) for k in range(3))
    bright_first = step[:, 0] < step[:, 1]
    gmean = (mean @ _GRAY) * np.where(bright_first, fb, 1.0)
    offset = (1.0 - fc) * gmean * np.where(bright_first, 1.0, fb)
    scale = fb * fc
    m = (scale * fs)[:, None, None] * np.eye(3) + (scale * (1.0 - fs))[:, None, None] * _TO_GRAY
    if hue_mode == "yiq":
        hue = on[:, 3] & (f[:, 3] != 0)
        if hue.any():
            m[hue] = m[hue] @ yiq_hue_matrix(f[hue, 3])
    return np.concatenate([m, np.repeat(offset[:, None, None], 3, axis=1)], axis=2)


def _affine(x: Tensor, mc: np.ndarray) -> Tensor:
    """x (N, 3, S, S) -> clamp(M x + c) per view with mc (N, 3, 4): one batched matmul."""
    n = x.shape[0]
    t = torch.from_numpy(mc).float()
    y = torch.baddbmm(t[:, :, 3:], t[:, :, :3], x.reshape(n, 3, -1))
    return y.clamp_(0.0, 1.0).view_as(x)


def apply_color(x: Tensor, p: ViewParams, hue_mode: str) -> Tensor:
    """Jitter (random order) then grayscale, on the views that have any colour op."""
    sel = np.flatnonzero(p.jitter | p.gray)
    if sel.size == 0:
        return x
    if sel.size > len(p.gray) // 2:  # identity maps are exact and cheaper than gather/scatter
        sel = np.arange(len(p.gray))
    idx = torch.from_numpy(sel)
    y = x[idx] if sel.size < len(p.gray) else x
    means = y.mean(dim=(2, 3)).double().numpy()  # (n, 3)
    order, f, gray = p.order[sel], p.factors[sel], p.gray[sel]
    steps = np.broadcast_to(p.jitter[sel][:, None], (sel.size, 4))
    if hue_mode == "hsv":
        # the exact hue shift is not affine: compose the steps before it, shift, then after
        split = steps[:, 0] & (f[:, 3] != 0)
        pos = np.argmax(order == 3, axis=1)
        before = steps & (np.arange(4) < pos[:, None])
        after = steps & (np.arange(4) > pos[:, None])
        pre_steps = np.where(split[:, None], before, steps & (order != 3))
        pre = _compose(order, f, means, pre_steps, hue_mode)
        pre[gray & ~split] = _TO_GRAY @ pre[gray & ~split]
        y = _affine(y, pre)
        if 2 * split.sum() > split.size:
            # most views shift hue: shifting all (by 0 elsewhere, exact up to rounding, with
            # identity post maps) is cheaper than a gather and a scatter
            shift = np.where(split, f[:, 3], 0.0)
            z = hsv_shift(y, torch.from_numpy(shift).float())
            zmean = z.mean(dim=(2, 3)).double().numpy()
            post = _compose(order, f, zmean, after & split[:, None], hue_mode)
            post[gray & split] = _TO_GRAY @ post[gray & split]
            y = _affine(z, post)
        elif split.any():
            rows = torch.from_numpy(np.flatnonzero(split))
            z = hsv_shift(y[rows], torch.from_numpy(f[split, 3]).float())
            zmean = z.mean(dim=(2, 3)).double().numpy()
            post = _compose(order[split], f[split], zmean, after[split], hue_mode)
            post[gray[split]] = _TO_GRAY @ post[gray[split]]
            y[rows] = _affine(z, post)
    else:
        pre = _compose(order, f, means, steps, hue_mode)
        pre[gray] = _TO_GRAY @ pre[gray]
        y = _affine(y, pre)
    if sel.size < len(p.gray):
        x[idx] = y
        return x
    return y
