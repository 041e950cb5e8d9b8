"""SigLIP against a naive per-pair loop and analytic values (single process)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mmssl.objectives import SigLipLoss, positives_from_labels, siglip_loss


def naive_siglip(img: Tensor, txt: Tensor, t: float, b: float, pos: Tensor | None) -> Tensor:
    n = img.shape[0]
    x = [v / v.norm() for v in img]
    y = [v / v.norm() for v in txt]
    total = torch.zeros((), dtype=img.dtype)
    for i in range(n):
        for j in range(n):
            z = 1.0 if (i == j or (pos is not None and bool(pos[i, j]))) else -1.0
            total = total + torch.log(1 + torch.exp(-z * (t * x[i] @ y[j] + b)))
    return total / n


@pytest.mark.parametrize("use_mask", [False, True])
def test_siglip_matches_naive_loop(use_mask: bool) -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    txt = torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    pos = positives_from_labels(torch.tensor([0, 1, 0, 2, 1, 0])) if use_mask else None
    got = siglip_loss(img, txt, 5.0, -2.0, pos)
    ref = naive_siglip(img, txt, 5.0, -2.0, pos)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(got, (img, txt)), torch.autograd.grad(ref, (img, txt))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_siglip_mask_without_diagonal_keeps_matching_pairs_positive() -> None:
    # the naive loop's z_ij = +1 for i = j: a caller's mask cannot turn a matching pair negative
    g = torch.Generator().manual_seed(4)
    img = torch.randn(6, 5, generator=g, dtype=torch.float64)
    txt = torch.randn(6, 5, generator=g, dtype=torch.float64)
    eye = torch.eye(6, dtype=torch.bool)
    for pos in (positives_from_labels(torch.tensor([0, 1, 0, 2, 1, 0])) & ~eye, eye & ~eye):
        torch.testing.assert_close(
            siglip_loss(img, txt, 5.0, -2.0, pos),
            naive_siglip(img, txt, 5.0, -2.0, pos),
            atol=1e-10,
            rtol=1e-10,
        )


def test_siglip_perfectly_separated_analytic() -> None:
    n, t, b = 5, 10.0, -10.0
    e = torch.eye(n, dtype=torch.float64)
    # one positive pair at t + b, N - 1 negative pairs at b, per image
    expected = math.log1p(math.exp(-(t + b))) + (n - 1) * math.log1p(math.exp(b))
    assert float(siglip_loss(e, e, t, b)) == pytest.approx(expected, rel=1e-12)


def test_siglip_module_init_and_modes_without_process_group() -> None:
    img, txt = torch.randn(6, 4), torch.randn(6, 4)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    for gather in ("chunked", "local_loss", "full"):
        m = SigLipLoss(gather=gather)
        assert m.logit_scale.item() == pytest.approx(math.log(10))
        assert m.logit_bias.item() == -10.0
        torch.testing.assert_close(m(img, txt), siglip_loss(img, txt, 10.0, -10.0))
        torch.testing.assert_close(
            m(img, txt, labels), siglip_loss(img, txt, 10.0, -10.0, positives_from_labels(labels))
        )


def test_siglip_bad_inputs() -> None:
    with pytest.raises(ValueError, match="gather must be one of"):
        SigLipLoss(gather="ring")
    with pytest.raises(ValueError, match=r"must both be \(B, D\)"):
        siglip_loss(torch.randn(2, 3), torch.randn(3, 3), 1.0, 0.0)
    with pytest.raises(ValueError, match="positives mask has shape"):
        siglip_loss(torch.randn(2, 3), torch.randn(2, 3), 1.0, 0.0, torch.ones(3, 3).bool())
    with pytest.raises(ValueError, match="positive_keys has 3 rows"):
        SigLipLoss()(torch.randn(2, 3), torch.randn(2, 3), torch.arange(3))
