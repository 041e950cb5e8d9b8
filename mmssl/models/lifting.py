"""Lifted representations for homomorphic SSL: fibers indexed by group elements.

A representation f is equivariant when f(T_g x) = Gamma_g f(x).  Lifting makes the group
axis explicit, so that an augmented view's feature is a fiber of the un-augmented input's
lifted representation: L(T_g x)(e) = L(x)(g^-1) (Keller, Suau and Zappella, 2022).

- Translations by whole patches: L(x)(u) is the mean of the patch tokens in the
  `window` x `window` grid window whose top-left corner is u.  The group acts by
  L(T_g x)(u) = L(x)(u - g) for windows away from the border, given a shift-equivariant
  token grid (rope, no absolute table, `VisionConfig.attn_window`).  The window plays the
  role of the crop scale.
- C4 rotations: L(x)(g) = f(T_g^-1 x) for g = 0..3 quarter turns (`torch.rot90`), so the
  group acts exactly as a cyclic shift of the group axis: L(T_h x) = roll(L(x), h).
- `remove_structure`, the ablation: a fixed random orthogonal map over the fiber axes,
  reshaped to the same shape; it keeps the information but the fibers are no longer related
  by the group action.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

ROTATIONS = 4


def translate(images: torch.Tensor, shift: torch.Tensor, patch_size: int = 1) -> torch.Tensor:
    """T_g: move the content by `shift` (rows, cols) whole patches, filling with zeros.

    images: (B, C, H, W); shift: (2,) for every image or (B, 2) per image, int.
    """
    b, _, h, w = images.shape
    shift = torch.as_tensor(shift, device=images.device)
    # .long() truncates: a shift of 0.6 patches moved nothing and -1.5 moved one, silently
    if shift.is_floating_point() and not (shift.isfinite() & (shift == shift.round())).all():
        raise ValueError(f"shift must be whole patches (integers), got {shift.tolist()}")
    if tuple(shift.shape) not in ((2,), (b, 2)):
        raise ValueError(f"shift must be (2,) or (B, 2) = ({b}, 2), got {tuple(shift.shape)}")
    shift = shift.long().expand(b, 2) * patch_size
    rows = torch.arange(h, device=images.device)[None] - shift[:, :1]  # (B, H) source rows
    cols = torch.arange(w, device=images.device)[None] - shift[:, 1:]  # (B, W)
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    idx = torch.arange(b, device=images.device)[:, None, None]
    out = images.permute(0, 2, 3, 1)[
        idx, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]
    ]
    return (out * valid[..., None].to(out.dtype)).permute(0, 3, 1, 2)  # (B, C, H, W)


def rotate(images: torch.Tensor, k: int) -> torch.Tensor:
    """T_k of C4: k quarter turns (counter-clockwise, `torch.rot90`).  images: (..., H, W)."""
    return torch.rot90(images, k % ROTATIONS, dims=(-2, -1))


def translation_lift(tokens: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """Window fibers of a token grid.  tokens: (B, N, D) row-major over grid (gh, gw).

    Returns (B, gh - window + 1, gw - window + 1, D): the mean token of every window.
    """
    b, n, d = tokens.shape
    gh, gw = grid
    if n != gh * gw:
        raise ValueError(f"tokens have {n} positions, grid {gh}x{gw} needs {gh * gw}")
    if not 1 <= window <= min(gh, gw):
        raise ValueError(f"window must be in 1..{min(gh, gw)} for a {gh}x{gw} grid, got {window}")
    x = tokens.transpose(1, 2).reshape(b, d, gh, gw)
    return F.avg_pool2d(x, window, stride=1).permute(0, 2, 3, 1)  # (B, H', W', D)


def rotation_lift(
    encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor
) -> torch.Tensor:
    """C4 fibers L(x)(g) = encode(T_g^-1 x).  images: (B, C, H, W) -> (B, 4, D).

    `encode` maps (4B, C, H, W) -> (4B, D) (e.g. pooled features); one call for all rotations.
    The fiber axis is cyclic (fiber 3 is a quarter turn from fiber 0): sample its pairs with
    `HSSLLoss.sample(lifted, cyclic=(True,))`.
    """
    b, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    if h != w:  # a quarter turn swaps H and W: the rotated batches would not concatenate
        raise ValueError(f"rotation_lift needs square images, got {h}x{w}")
    feats = encode(torch.cat([rotate(images, -g) for g in range(ROTATIONS)]))  # (4B, D)
    # a (4B, N, D) token output would reshape without error into (B, 4, N*D) fibers
    if feats.ndim != 2 or feats.shape[0] != ROTATIONS * b:
        raise ValueError(
            f"encode must return ({ROTATIONS * b}, D) for {ROTATIONS * b} images, "
            f"got {tuple(feats.shape)}"
        )
    return feats.reshape(ROTATIONS, b, -1).transpose(0, 1)  # (B, 4, D)


@functools.cache
def _orthogonal(num_fibers: int, seed: int) -> torch.Tensor:
    # built outside inference mode whatever the first caller's mode: a cached inference
    # tensor (first built by an eval under torch.inference_mode) failed every later backward
    with torch.inference_mode(False):
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(num_fibers, num_fibers, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(a)
        return (q * r.diagonal().sign()).float()  # sign fix: Haar-distributed, not QR-dependent


def unstructured_map(num_fibers: int, seed: int = 0) -> torch.Tensor:
    """A fixed random orthogonal (num_fibers, num_fibers) matrix, deterministic in `seed`."""
    # a copy: the cached matrix is shared, so a caller's in-place edit changed it for all
    return _orthogonal(num_fibers, seed).clone()


def remove_structure(lifted: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The "structure removed" ablation: mix the fibers by `unstructured_map`, same shape.

    lifted: (B, *S, D) with fiber axes S, e.g. (H', W') or (4,).  Every output fiber is a
    fixed random combination of all input fibers, so no group action relates them.
    """
    flat = lifted.flatten(1, -2)  # (B, F, D)
    m = unstructured_map(flat.shape[1], seed).to(lifted.device, lifted.dtype)
    return torch.einsum("fg,bgd->bfd", m, flat).reshape(lifted.shape)
