"""From a batch's uniform draws to view parameters and views in one compiled call (numba).

`view_params` turns the draws of `mmssl.data.augment.sample_params` into the parameters
of the views (the same floats as augment's numpy fallback); `render_drawn` makes and
renders them with `mmssl.data.fastviews.render` in one call (`make_views`' fast path).
Compiled and cached on disk like `mmssl.data.fastviews`; `mmssl.data.augment` imports
this module on first use only.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from mmssl.data import buffers
from mmssl.data.fastcolor import _HUE_BASIS
from mmssl.data.fastviews import _NO_HUE, Sources, render


@numba.njit(cache=True, nogil=True)  # no fastmath: boxes must equal the numpy ones
def crop_boxes(
    hw: np.ndarray, scale: np.ndarray, aspect: np.ndarray, u: np.ndarray, r0: float, r1: float
) -> np.ndarray:  # pragma: no cover
    """`mmssl.data.augment._crop_boxes` (same arguments and result) as one loop."""
    b, tries = scale.shape
    box = np.empty((b, 4), np.int64)
    for k in range(b):
        H, W = hw[k, 0], hw[k, 1]
        h = w = top = left = -1.0
        for t in range(tries):
            target = H * W * scale[k, t]
            w = np.rint(np.sqrt(target * aspect[k, t]))
            h = np.rint(np.sqrt(target / aspect[k, t]))
            if w > 0 and h > 0 and w <= W and h <= H:
                top = np.floor(u[k, t, 0] * (H - h + 1))
                left = np.floor(u[k, t, 1] * (W - w + 1))
                break
        if top < 0:
            r = W / H
            # at least 1 px, as in augment._crop_boxes (a 1 px thick image rounded to 0)
            w = W if r < r0 else (max(np.rint(H * r1), 1.0) if r > r1 else W)
            h = max(np.rint(W / r0), 1.0) if r < r0 else H
            top, left = (H - h) // 2, (W - w) // 2
        box[k, 0], box[k, 1], box[k, 2], box[k, 3] = top, left, h, w
    return box


@numba.njit(cache=True, nogil=True)  # no fastmath: the same floats as the numpy fallback
def view_params(
    hw: np.ndarray, u: np.ndarray, aspect: np.ndarray, k: np.ndarray
) -> tuple[np.ndarray, ...]:  # pragma: no cover
    """`mmssl.data.augment._params_numpy` (same arguments and result) in one pass: the
    parameters of B views from their uniform draws u (B, VIEW_DRAWS), the crop aspect
    ratios (B, 10) and the constants k (`augment.param_constants`).  Columns of u: 0-9
    crop scale, 10-19 aspect (given as `aspect`), 20-39 crop positions, 40 jitter, 41-44
    factors, 45-48 the jitter order's sort keys, 49 grayscale, 50 blur, 51 sigma,
    52 solarize, 53 flip."""
    b = u.shape[0]
    scale, pos = np.empty((b, 10)), np.empty((b, 10, 2))
    for v in range(b):
        for t in range(10):
            scale[v, t] = k[0] + (k[1] - k[0]) * u[v, t]
            pos[v, t, 0], pos[v, t, 1] = u[v, 20 + 2 * t], u[v, 21 + 2 * t]
    box = crop_boxes(hw, scale, aspect, pos, k[2], k[3])
    flip, jitter = np.empty(b, np.bool_), np.empty(b, np.bool_)
    gray, solarize = np.empty(b, np.bool_), np.empty(b, np.bool_)
    factors, order, sigma = np.empty((b, 4)), np.empty((b, 4), np.int64), np.empty(b)
    for v in range(b):
        jitter[v] = u[v, 40] < k[4]
        for f in range(4):
            if jitter[v]:
                factors[v, f] = k[5 + f] + (k[9 + f] - k[5 + f]) * u[v, 41 + f]
            else:
                factors[v, f] = 1.0 if f < 3 else 0.0
        for f in range(4):  # a stable argsort of the 4 keys
            rank = 0
            for g in range(4):
                key_g, key_f = u[v, 45 + g], u[v, 45 + f]
                rank += key_g < key_f or (key_g == key_f and g < f)
            order[v, rank] = f
        gray[v] = u[v, 49] < k[13]
        sigma[v] = k[15] + (k[16] - k[15]) * u[v, 51] if u[v, 50] < k[14] else 0.0
        solarize[v] = u[v, 52] < k[17]
        flip[v] = u[v, 53] < k[18]
    return box, flip, jitter, factors, order, gray, sigma, solarize


@numba.njit(cache=True, nogil=True)
def render_drawn(
    addrs: np.ndarray,
    H: int,
    W: int,
    u: np.ndarray,
    aspect: np.ndarray,
    k: np.ndarray,
    hue: np.ndarray,
    solarize_t: float,
    out: np.ndarray,
    desc: np.ndarray,
) -> None:  # pragma: no cover
    """`render` of N = len(u) views, view v from source v % M, with the parameters that
    `view_params` makes of the draws (u, aspect) and constants k: `make_views` in one
    call, without the parameter arrays in Python (their allocation, boxing and checks
    at the call cost ~0.4 us a sample of two views at batch 64)."""
    n, m = u.shape[0], addrs.shape[0]
    hw = np.empty((n, 2))
    vsrc = np.empty(n, np.int64)
    for v in range(n):
        hw[v, 0], hw[v, 1] = H, W
        vsrc[v] = v % m
    box, flip, jitter, factors, order, gray, sigma, solarize = view_params(hw, u, aspect, k)
    render(
        addrs,
        H,
        W,
        vsrc,
        box,
        flip,
        sigma,
        jitter,
        factors,
        order,
        gray,
        solarize,
        hue,
        solarize_t,
        out,
        desc,
    )


def render_draws(
    src: Sources,
    u: np.ndarray,
    aspect: np.ndarray,
    k: np.ndarray,
    size: int,
    hue_mode: str,
    solarize_t: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fastviews.render_views` of len(u) views, view v from image v % M, drawn as `sample_params`
    draws them (u, aspect: `augment._draws`; k: `augment.param_constants`)."""
    n = len(u)
    out = buffers.empty(n, 3, size, size)  # huge pages, or shared in a worker: mmssl.data.buffers
    desc = torch.empty(n, 13)
    hue = _HUE_BASIS if hue_mode == "yiq" else _NO_HUE
    render_drawn(
        src.addrs,
        src.height,
        src.width,
        u,
        aspect,
        k,
        hue,
        float(solarize_t),
        out.numpy(),
        desc.numpy(),
    )
    return out, desc
