"""Compiled colour jitter (numba) for one view: the kernels of `mmssl.data.fastviews`.

Same maths as the torch reference `mmssl.data.colorops.apply_color`: the jitter steps
before the hue shift and the grayscale fold into one affine map, then clamp, the exact
HSV shift, the steps after it, clamp (YIQ mode: one map with the hue rotation folded in).
Contrast blends towards the grey mean of the image it acts on, measured here per view.
The pixel loops are branch-free (selects, min/max, floor) so that LLVM vectorises them;
channel sums run in float32 per row and float64 across rows.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from mmssl.data.colorops import _GRAY, _RGB2YIQ, _YIQ2RGB

_JIT: dict[str, Any] = {"cache": True, "fastmath": True, "nogil": True}
_G0, _G1, _G2 = (float(g) for g in _GRAY)
# the YIQ hue rotation by angle a is A + cos(a) B + sin(a) C (`colorops.yiq_hue_matrix`)
_HUE_BASIS = np.stack(
    [
        _YIQ2RGB @ np.diag([1.0, 0.0, 0.0]) @ _RGB2YIQ,
        _YIQ2RGB @ np.diag([0.0, 1.0, 1.0]) @ _RGB2YIQ,
        _YIQ2RGB @ np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]) @ _RGB2YIQ,
    ]
)


@numba.njit(**_JIT)
def _compose(
    order: np.ndarray, f: np.ndarray, active: np.ndarray, gray: bool, hue: np.ndarray, m: np.ndarray
) -> None:  # pragma: no cover
    """m (3, 4) <- the affine map of the jitter steps `active` (by step), then grayscale if
    `gray`: `mmssl.data.colorops._compose` for one view, with column 3 the offset per unit
    grey mean of the input.  hue (3, 3, 3): the YIQ hue basis, or empty for no YIQ hue."""
    fb = fc = fs = 1.0
    hue_on = False
    for k in range(4):
        if active[k]:
            op = order[k]
            fb = f[0] if op == 0 else fb
            fc = f[1] if op == 1 else fc
            fs = f[2] if op == 2 else fs
            hue_on = hue_on or op == 3
    scale = fb * fc
    gray_w = (_G0, _G1, _G2)
    for a in range(3):
        for b in range(3):
            m[a, b] = scale * (1.0 - fs) * gray_w[b] + (scale * fs if a == b else 0.0)
    if hue.shape[0] == 3 and hue_on and f[3] != 0.0:
        cos, sin = np.cos(2.0 * np.pi * f[3]), np.sin(2.0 * np.pi * f[3])
        for a in range(3):  # m[a, :3] <- m[a, :3] @ rotation, one row at a time
            r0, r1, r2 = m[a, 0], m[a, 1], m[a, 2]
            for b in range(3):
                m[a, b] = (
                    r0 * (hue[0, 0, b] + cos * hue[1, 0, b] + sin * hue[2, 0, b])
                    + r1 * (hue[0, 1, b] + cos * hue[1, 1, b] + sin * hue[2, 1, b])
                    + r2 * (hue[0, 2, b] + cos * hue[1, 2, b] + sin * hue[2, 2, b])
                )
    for a in range(3):
        # contrast adds (1 - fc) x its input's grey mean; brightness scales that mean if
        # it ran first and the added constant if it runs later: (1 - fc) fb either way
        m[a, 3] = (1.0 - fc) * fb
    if gray:
        for b in range(4):
            g = _G0 * m[0, b] + _G1 * m[1, b] + _G2 * m[2, b]
            m[0, b] = m[1, b] = m[2, b] = g


@numba.njit(**_JIT)
def _affine(x: np.ndarray, m: np.ndarray, gm: float, means: np.ndarray) -> None:  # pragma: no cover
    """x (3, S, S) <- clamp(M x + m[:, 3] gm, 0, 1) in place; means (3,) of the result."""
    m00, m01, m02 = np.float32(m[0, 0]), np.float32(m[0, 1]), np.float32(m[0, 2])
    m10, m11, m12 = np.float32(m[1, 0]), np.float32(m[1, 1]), np.float32(m[1, 2])
    m20, m21, m22 = np.float32(m[2, 0]), np.float32(m[2, 1]), np.float32(m[2, 2])
    c0, c1, c2 = np.float32(m[0, 3] * gm), np.float32(m[1, 3] * gm), np.float32(m[2, 3] * gm)
    zero, one = np.float32(0.0), np.float32(1.0)
    s0 = s1 = s2 = 0.0
    for i in range(x.shape[1]):
        r_, g_, b_ = x[0, i], x[1, i], x[2, i]
        p0 = p1 = p2 = np.float32(0.0)  # float32 per row, float64 across rows
        for p in range(r_.shape[0]):
            r, g, b = r_[p], g_[p], b_[p]
            r2 = min(max(m00 * r + m01 * g + m02 * b + c0, zero), one)
            g2 = min(max(m10 * r + m11 * g + m12 * b + c1, zero), one)
            b2 = min(max(m20 * r + m21 * g + m22 * b + c2, zero), one)
            r_[p], g_[p], b_[p] = r2, g2, b2
            p0 += r2
            p1 += g2
            p2 += b2
        s0, s1, s2 = s0 + p0, s1 + p1, s2 + p2
    n = x.shape[1] * x.shape[2]
    means[0], means[1], means[2] = s0 / n, s1 / n, s2 / n


@numba.njit(**_JIT)
def _affine_hsv(x: np.ndarray, m: np.ndarray, gm: float, shift: float) -> float:  # pragma: no cover
    """x (3, S, S) <- hsv_shift(clamp(M x + m[:, 3] gm, 0, 1), shift) in place; returns the
    grey mean of the result.  The exact HSV hue shift (`shift` in turns), branch-free
    (selects, min/max, floor) so that the pixel loop vectorises: the hue as a triangle
    wave, as `mmssl.data.colorops.hsv_shift`."""
    m00, m01, m02 = np.float32(m[0, 0]), np.float32(m[0, 1]), np.float32(m[0, 2])
    m10, m11, m12 = np.float32(m[1, 0]), np.float32(m[1, 1]), np.float32(m[1, 2])
    m20, m21, m22 = np.float32(m[2, 0]), np.float32(m[2, 1]), np.float32(m[2, 2])
    c0, c1, c2 = np.float32(m[0, 3] * gm), np.float32(m[1, 3] * gm), np.float32(m[2, 3] * gm)
    zero, one, two = np.float32(0.0), np.float32(1.0), np.float32(2.0)
    three, six = np.float32(3.0), np.float32(6.0)
    sh = np.float32(6.0 * shift)
    k0, k1, k2 = np.float32(_G0), np.float32(_G1), np.float32(_G2)
    zs = 0.0
    for i in range(x.shape[1]):
        r_, g_, b_ = x[0, i], x[1, i], x[2, i]
        zrow = np.float32(0.0)
        for p in range(r_.shape[0]):
            r0, g0, b0 = r_[p], g_[p], b_[p]
            r = min(max(m00 * r0 + m01 * g0 + m02 * b0 + c0, zero), one)
            g = min(max(m10 * r0 + m11 * g0 + m12 * b0 + c1, zero), one)
            b = min(max(m20 * r0 + m21 * g0 + m22 * b0 + c2, zero), one)
            mx = max(r, max(g, b))
            cr = mx - min(r, min(g, b))
            hg = two * cr + (b - r)
            hb = np.float32(4.0) * cr + (r - g)
            h = (g - b) if r == mx else (hg if g == mx else hb)
            h = h / max(cr, np.float32(1e-30)) + sh
            h = h - six * np.floor(h * np.float32(1.0 / 6.0))  # [0, 6)
            tr = min(max(two - abs(h - three), zero), one)
            tg = min(max(abs(abs(h - np.float32(5.0)) - three) - one, zero), one)
            tb = min(max(abs(abs(h - one) - three) - one, zero), one)
            r2, g2, b2 = mx - cr * tr, mx - cr * tg, mx - cr * tb
            r_[p], g_[p], b_[p] = r2, g2, b2
            zrow += k0 * r2 + k1 * g2 + k2 * b2
        zs += zrow
    return zs / (x.shape[1] * x.shape[2])


@numba.njit(**_JIT)
def _color(
    x: np.ndarray,
    order: np.ndarray,
    f: np.ndarray,
    jitter: bool,
    gray: bool,
    hue: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    pre: np.ndarray,
    post: np.ndarray,
    steps: np.ndarray,
) -> None:  # pragma: no cover
    """Jitter (random order) then grayscale of one view x (3, S, S) in place, as
    `mmssl.data.colorops.apply_color`; hue: the YIQ basis (3, 3, 3), or empty for the
    exact HSV shift.  `after` gets the channel means of the result."""
    split = hue.shape[0] == 0 and jitter and f[3] != 0.0  # hsv: steps before, shift, after
    pos = 0
    for k in range(4):
        if order[k] == 3:
            pos = k
    for k in range(4):
        # before the hue shift; else every step (a hue of 0 is the identity in HSV)
        steps[k] = jitter and (k < pos if split else True)
    _compose(order, f, steps, gray and not split, hue, pre)
    gm = _G0 * before[0] + _G1 * before[1] + _G2 * before[2]
    if split:
        zm = _affine_hsv(x, pre, gm, f[3])
        for k in range(4):
            steps[k] = k > pos
        _compose(order, f, steps, gray, hue, post)
        _affine(x, post, zm, after)
    else:
        _affine(x, pre, gm, after)
