"""The torch reference path of view rendering: crop, resize, flip and blur.

`mmssl.data.fastviews` is the compiled one and is tested against it.  Crop + resize +
flip + blur are two batched matmuls with per-view resampling matrices for views up to
64 px, and one `grid_sample` plus a grouped-convolution blur above (a mixed-size batch:
one antialiased resize per view and a separate blur).  The colour ops follow in
`mmssl.data.colorops`; `mmssl.data.augment.apply_params` dispatches between the paths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from mmssl.data.augment import ViewParams


def _interp(start: Tensor, length: Tensor, src: int, size: int, flip: Tensor) -> Tensor:
    """(B, src, size) bilinear resampling weights of [start, start + length) onto `size`
    pixels (pixel centres, border clamp: the maths of grid_sample/roi_align)."""
    k = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    u = (start[:, None] + k * length[:, None] - 0.5).clamp(0, src - 1)  # (B, S)
    u = torch.where(flip[:, None], u.flip(-1), u)
    i0 = u.floor()
    frac = (u - i0).float()[:, None, :]
    i1 = (i0 + 1).clamp(max=src - 1)
    w = torch.zeros(len(u), src, size)
    w.scatter_add_(1, i0.long()[:, None, :], 1 - frac)
    return w.scatter_add_(1, i1.long()[:, None, :], frac)


def _gauss(sigma: np.ndarray, size: int) -> Tensor:
    """(B, size, size) Gaussian blur matrices (reflect padding); identity where sigma is 0.

    Kernel size ~10% of the image, odd, at least 3 (SimCLR's choice).
    """
    b = len(sigma)
    k = max(3, int(0.1 * size) // 2 * 2 + 1)
    r = k // 2
    pos = torch.arange(-r, r + 1, dtype=torch.float64)
    s = torch.from_numpy(np.where(sigma > 0, sigma, 1.0))[:, None]
    ker = torch.exp(-0.5 * (pos / s) ** 2)
    ker = ker / ker.sum(1, keepdim=True)  # (B, k)
    idx = torch.arange(size)[:, None] + torch.arange(-r, r + 1)[None, :]  # (S, k)
    idx = idx.abs()
    idx = torch.where(idx > size - 1, 2 * (size - 1) - idx, idx)
    g = torch.zeros(b, size, size, dtype=torch.float64)
    g.scatter_add_(2, idx.expand(b, size, k), ker[:, None, :].expand(b, size, k))
    eye = torch.eye(size, dtype=torch.float64).expand(b, size, size)
    return torch.where(torch.from_numpy(sigma > 0)[:, None, None], g, eye).float()


def _crop_resize(images: list[Tensor], p: ViewParams, size: int) -> Tensor:
    """(B, 3, size, size) float in [0, 1]: each box cropped, resized, flipped, blurred.

    A batch of one source size goes through two batched matmuls with per-view
    resampling matrices (Gaussian blur folded in: it is linear too); mixed sizes take one
    antialiased resize per view plus a separate blur.
    """
    b = len(images)
    shape = images[0].shape
    uniform = all(im.shape == shape for im in images) and max(shape[1:]) <= 1.5 * size
    if uniform and size > 64:
        # large views: matmul cost grows with size^3, grid_sample with size^2
        H, W = int(shape[1]), int(shape[2])
        box = torch.from_numpy(p.box).float()
        k = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # (S,)
        gx = (2 * (box[:, 1:2] + k * box[:, 3:4]) / W) - 1  # (B, S), pixel-centre coords
        gx = torch.where(torch.from_numpy(p.flip)[:, None], gx.flip(-1), gx)
        gy = (2 * (box[:, 0:1] + k * box[:, 2:3]) / H) - 1
        grid = torch.stack(
            [gx[:, None, :].expand(b, size, size), gy[:, :, None].expand(b, size, size)], dim=-1
        )
        x = torch.stack(images).float().div_(255.0)  # (B, 3, H, W)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return _blur(x, p.sigma)
    if uniform:
        H, W = int(shape[1]), int(shape[2])
        box = torch.from_numpy(p.box).double()
        noflip = torch.zeros(b, dtype=torch.bool)
        ay = _interp(box[:, 0], box[:, 2], H, size, noflip).transpose(1, 2)  # (B, S, H)
        ax = _interp(box[:, 1], box[:, 3], W, size, torch.from_numpy(p.flip))  # (B, W, S)
        if (p.sigma > 0).any():
            g = _gauss(p.sigma, size)
            ay, ax = g @ ay, ax @ g.transpose(1, 2)
        x = torch.stack(images).float().div_(255.0)  # (B, 3, H, W)
        x = torch.matmul(x.view(b, 3 * H, W), ax).view(b, 3, H, size)
        return torch.matmul(ay[:, None], x)  # (B, 3, S, S)
    out = torch.empty(b, 3, size, size)
    for i, im in enumerate(images):
        t, l, h, w = (int(v) for v in p.box[i])
        crop = im[None, :, t : t + h, l : l + w].float()
        big = h > size or w > size
        v = F.interpolate(crop, (size, size), mode="bilinear", align_corners=False, antialias=big)
        out[i] = (v[0].flip(-1) if p.flip[i] else v[0]).div_(255.0)
    return _blur(out, p.sigma)


def _blur(x: Tensor, sigma: np.ndarray) -> Tensor:
    """Separable Gaussian blur of the views with sigma > 0 (reflect padding)."""
    sel = np.flatnonzero(sigma > 0)
    if sel.size == 0:
        return x
    size = x.shape[-1]
    k = max(3, int(0.1 * size) // 2 * 2 + 1)  # SimCLR: kernel ~10% of the image, odd
    r = k // 2
    pos = torch.arange(-r, r + 1, dtype=torch.float32)
    s = torch.from_numpy(sigma[sel]).float()[:, None]
    ker = torch.exp(-0.5 * (pos / s) ** 2)
    ker = ker / ker.sum(1, keepdim=True)  # (n, k)
    idx = torch.from_numpy(sel)
    y = x[idx]
    n = y.shape[0]
    if k <= 7:  # a few shifted multiply-adds beat a grouped convolution
        w = ker[:, :, None, None, None]  # (n, k, 1, 1, 1)
        z = F.pad(y, (r, r, 0, 0), mode="reflect")
        y = w[:, 0] * z[..., :size]
        for t in range(1, k):
            y = y + w[:, t] * z[..., t : t + size]
        z = F.pad(y, (0, 0, r, r), mode="reflect")
        y = w[:, 0] * z[..., :size, :]
        for t in range(1, k):
            y = y + w[:, t] * z[..., t : t + size, :]
    else:
        kk = ker.repeat_interleave(3, 0)  # (n*3, k)
        z = y.reshape(1, n * 3, size, size)
        z = F.conv2d(F.pad(z, (r, r, 0, 0), mode="reflect"), kk[:, None, None, :], groups=n * 3)
        z = F.conv2d(F.pad(z, (0, 0, r, r), mode="reflect"), kk[:, None, :, None], groups=n * 3)
        y = z.view(n, 3, size, size)
    x[idx] = y
    return x
