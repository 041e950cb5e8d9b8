"""The un-augmented image: shorter side to `size`, centre crop.

`resize_center` follows torchvision's `Resize(size)` + `CenterCrop(size)` on float images:
bilinear, antialiased when shrinking (open_clip's eval transform has the same sizes and
crop, but resizes bicubic).  Resizing the whole image before cropping needs
memory for the resized image, which an extreme aspect ratio makes huge (a 20000 x 1
banner at 224 px resizes to 224 x 4.48M: 12 GB of float32), so such images take a second
path that computes only the crop's pixels, with the same weights (`_taps`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mmssl.data import buffers

# resized images with more pixels than this many crops resample only the crop (`_crop_only`)
CROP_ONLY_ABOVE = 16


def resize_center(images: list[Tensor], size: int) -> Tensor:
    """uint8 (3, H, W) images -> float (B, 3, size, size) in [0, 1].

    Sizes and offsets follow torchvision's `Resize(size)` + `CenterCrop(size)`, as open_clip's
    eval transform's do: the longer side truncated (`int(size * long / short)`),
    the crop offset `int(round((h - size) / 2))` (Python rounds halves to even)."""
    out = buffers.empty(len(images), 3, size, size)
    for i, im in enumerate(images):
        h, w = int(im.shape[1]), int(im.shape[2])
        if min(h, w) < 1:  # the decoders never give one; a caller's tensor may
            raise ValueError(f"image {i} is {h}x{w} pixels: nothing to resize")
        if (h, w) == (size, size):
            out[i] = im.float().div_(255.0)
            continue
        short, long = min(h, w), max(h, w)
        resized = int(size * long / short)
        nh, nw = (size, resized) if h <= w else (resized, size)
        t, l = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        if resized > CROP_ONLY_ABOVE * size:
            v = _crop_only(im, (nh, nw), (t, l), size, antialias=size < short)
        else:
            v = F.interpolate(im[None].float(), (nh, nw), mode="bilinear", antialias=size < short)
            v = v[0, :, t : t + size, l : l + size]
        out[i] = v.clamp_(0, 255).div_(255.0)
    return out


def _taps(n_in: int, n_out: int, first: int, count: int, antialias: bool) -> tuple[Tensor, Tensor]:
    """Source indices and weights, both (count, taps), of the output pixels [first, first +
    count) of a bilinear resize n_in -> n_out along one axis, by torch's rules in float32:
    align_corners=False; without antialias the source coordinate clamped at 0 and the
    pixel after it; with antialias a triangle filter widened by the scale when shrinking,
    its weights normalised.  Unused taps get weight 0 (and a valid index)."""
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    i = np.arange(first, first + count).astype(f32)
    if not antialias:
        src = np.maximum(scale * (i + f32(0.5)) - f32(0.5), f32(0.0))
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        lam = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0))
        i1 = i0 + (i0 < n_in - 1)
        idx, w = np.stack([i0, i1], 1), np.stack([f32(1.0) - lam, lam], 1)
    else:
        support = scale if scale >= 1.0 else f32(1.0)
        invscale = f32(1.0) / scale if scale >= 1.0 else f32(1.0)
        center = scale * (i + f32(0.5))
        lo = np.maximum((center - support + f32(0.5)).astype(np.int64), 0)
        hi = np.minimum((center + support + f32(0.5)).astype(np.int64), n_in)
        idx = lo[:, None] + np.arange(max(1, int((hi - lo).max())))
        d = (idx.astype(f32) - center[:, None] + f32(0.5)) * invscale
        w = np.where(idx < hi[:, None], np.maximum(f32(1.0) - np.abs(d), f32(0.0)), f32(0.0))
        total = w.sum(1, keepdims=True)
        w = np.where(total != 0, w / np.where(total != 0, total, f32(1.0)), w)
        idx = np.minimum(idx, n_in - 1)
    return torch.from_numpy(idx), torch.from_numpy(w.astype(f32))


def _crop_only(
    im: Tensor, resized: tuple[int, int], offset: tuple[int, int], size: int, antialias: bool
) -> Tensor:
    """The (3, size, size) crop at `offset` of im (3, H, W) resized to `resized`, float,
    computing only the crop: memory ~ the image plus its long axis resampled (the long axis
    goes first)."""
    h, w = int(im.shape[1]), int(im.shape[2])
    yi, yw = _taps(h, resized[0], offset[0], size, antialias)
    xi, xw = _taps(w, resized[1], offset[1], size, antialias)
    if w >= h:  # columns first: (3, h, size, taps) -> (3, h, size)
        x = (im[:, :, xi].float() * xw).sum(-1)
        return (x[:, yi, :] * yw[:, :, None]).sum(2)
    x = (im[:, yi, :].float() * yw[:, :, None]).sum(2)  # rows first: (3, size, w)
    return (x[:, :, xi] * xw).sum(-1)
