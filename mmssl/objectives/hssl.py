"""Homomorphic SSL (H-SSL): positives are two fibers of one lifted representation.

With an equivariant, lifted representation L (see `mmssl.models.lifting`), the feature of
the augmented view T_g x at the identity equals the fiber L(x)(g^-1).  So instead of two
augmented forward passes, H-SSL samples two fibers of one forward pass as the positive pair;
the fibers of the other images are the negatives.  The loss is NT-Xent over those fibers,
so it inherits NT-Xent's exactness under data parallelism (`NTXentLoss` gather modes).

Sampling plays the role of the augmentation distribution: the fiber grid (the window size
of a translation lift) sets the crop scale, `displacement` the augmentation strength.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmssl.objectives.contrastive import NTXentLoss, nt_xent_loss


def sample_fiber_pairs(
    batch_size: int,
    fiber_shape: tuple[int, ...],
    displacement: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    cyclic: tuple[bool, ...] | None = None,
) -> tuple[Tensor, Tensor]:
    """Two fiber indices per image, each (B, len(fiber_shape)) int64.

    The first is uniform over the fibers.  displacement=None: the second is independent and
    uniform too (two independent random crops); an int k: the second is uniform over the
    fibers within k of the first on every axis (Chebyshev distance <= k).  cyclic: per axis,
    whether it is a cyclic group (the C4 axis of `rotation_lift`: fiber 3 is a quarter turn
    from fiber 0), where "within k" wraps around; None: no axis is (translation windows).
    """
    if displacement is not None and displacement < 0:
        raise ValueError(f"displacement must be >= 0 or None, got {displacement}")
    if not fiber_shape or min(fiber_shape) < 1:
        raise ValueError(f"fiber_shape must be non-empty and positive, got {fiber_shape}")
    wrap = tuple(cyclic) if cyclic is not None else (False,) * len(fiber_shape)
    if len(wrap) != len(fiber_shape):
        raise ValueError(
            f"cyclic names {len(wrap)} axes, fiber_shape {tuple(fiber_shape)} has {len(fiber_shape)}"
        )
    size = torch.tensor(fiber_shape)

    def uniform(lo: Tensor, hi: Tensor) -> Tensor:  # integers in [lo, hi], elementwise
        u = torch.rand(lo.shape, generator=generator)
        return lo + (u * (hi - lo + 1)).long().clamp(max=hi - lo)

    shape = (batch_size, len(fiber_shape))
    first = uniform(torch.zeros(shape, dtype=torch.long), (size - 1).expand(shape))
    if displacement is None:
        second = uniform(torch.zeros(shape, dtype=torch.long), (size - 1).expand(shape))
    else:
        lo = (first - displacement).clamp(min=0)
        second = uniform(lo, torch.minimum(first + displacement, size - 1))
        for axis, n in enumerate(fiber_shape):
            if not wrap[axis]:
                continue
            # an offset in [-k, k] around the cycle (each fiber within k once), or any offset
            # when those cover the whole axis
            lo_k, hi_k = (-displacement, displacement) if 2 * displacement + 1 < n else (0, n - 1)
            step = uniform(torch.full((batch_size,), lo_k), torch.full((batch_size,), hi_k))
            second[:, axis] = (first[:, axis] + step) % n
    return first.to(device), second.to(device)


def gather_fibers(lifted: Tensor, index: Tensor) -> Tensor:
    """One fiber per image.  lifted: (B, *S, D); index: (B, len(S)) int -> (B, D)."""
    b, shape, d = lifted.shape[0], lifted.shape[1:-1], lifted.shape[-1]
    if index.shape != (b, len(shape)):
        raise ValueError(
            f"index must be (B, {len(shape)}) = ({b}, {len(shape)}), got {tuple(index.shape)}"
        )
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"index must hold integers, got {index.dtype}")
    if (index < 0).any() or (index >= torch.tensor(shape, device=index.device)).any():
        raise ValueError(f"fiber index out of range for fiber shape {tuple(shape)}")
    flat = torch.zeros(b, dtype=torch.long, device=index.device)
    for axis, n in enumerate(shape):  # row-major ravel of the multi-index
        flat = flat * n + index[:, axis]
    rows = lifted.reshape(b, -1, d)
    return rows[torch.arange(b, device=rows.device), flat.to(rows.device)]


def hssl_loss(lifted: Tensor, index1: Tensor, index2: Tensor, temperature: float = 0.1) -> Tensor:
    """H-SSL loss without a head: NT-Xent between the fibers index1 and index2 of each image.

    lifted: (B, *S, D); index1, index2: (B, len(S)).  Negatives: the fibers of other images.
    """
    return nt_xent_loss(gather_fibers(lifted, index1), gather_fibers(lifted, index2), temperature)


class HSSLLoss(nn.Module):
    """H-SSL objective: `sample` draws two fibers per image, `forward` scores them.

    A task runs lifted = lift(encoder(images)); f1, f2 = loss.sample(lifted);
    loss(head(f1), head(f2)).  `gather` as `NTXentLoss` ("local_loss" or "full").
    """

    def __init__(
        self, displacement: int | None = None, temperature: float = 0.1, gather: str = "local_loss"
    ) -> None:
        super().__init__()
        if displacement is not None and displacement < 0:
            raise ValueError(f"displacement must be >= 0 or None, got {displacement}")
        self.displacement = displacement
        self.nt_xent = NTXentLoss(temperature, gather)

    def sample(
        self,
        lifted: Tensor,
        generator: torch.Generator | None = None,
        cyclic: tuple[bool, ...] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """lifted: (B, *S, D) -> the two sampled fibers of every image, (B, D) each.
        cyclic: which fiber axes wrap (`sample_fiber_pairs`), e.g. (True,) for a rotation lift."""
        i1, i2 = sample_fiber_pairs(
            lifted.shape[0],
            tuple(lifted.shape[1:-1]),
            self.displacement,
            generator,
            lifted.device,
            cyclic,
        )
        return gather_fibers(lifted, i1), gather_fibers(lifted, i2)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """z1, z2: (B, E) projected fibers of this rank's images -> the global NT-Xent."""
        return self.nt_xent(z1, z2)

    def extra_repr(self) -> str:
        """The settings shown in the module's repr."""
        return f"displacement={self.displacement}"
