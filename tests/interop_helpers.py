"""Helpers for the interop parity tests (test_interop.py, test_interop_open_clip.py,
test_interop_timm.py): the tolerance, the max abs difference, and the perturbation of a
peer's 1-D parameters.

Each peer is built with a seeded random init (nothing downloads), its 1-D parameters (norms,
biases, logit scale) are perturbed so a swapped norm or a dropped bias cannot hide behind
init values of 1 and 0, the weights are converted, and both models run the same random
inputs in fp32 eval mode: max abs diff <= 1e-4.
"""

from __future__ import annotations

import torch

TOL = 1e-5  # fp32 max abs difference to the peer on the same weights (measured <= 3.4e-6)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add noise to every 1-D (and scalar) parameter: norm weights/biases, biases, scales."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.ndim <= 1:
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()
