"""AugSelf targets and losses against a per-element loop over the literal v1 layout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mmssl.objectives import AugSelfHead, augself_group_losses, augself_loss

# the v1 layout written out by hand, independent of mmssl.descriptor
V1 = {"blur": [0], "color": [1, 2, 3, 4], "color_diff": [5, 6, 7], "crop": [8, 9, 10, 11]}
GRAY = 12


def naive_losses(pred: Tensor, w1: Tensor, w2: Tensor) -> dict[str, float]:
    out = {}
    b = pred.shape[0]
    for name, dims in V1.items():
        sq = 0.0
        for i in range(b):
            for k in dims:
                sq += (math.tanh(float(pred[i, k])) - float(w1[i, k] - w2[i, k])) ** 2
        out[name] = sq / (b * len(dims))
    bce = 0.0
    for i in range(b):
        y = 1.0 if round(float(w1[i, GRAY])) == round(float(w2[i, GRAY])) else 0.0
        p = 1 / (1 + math.exp(-float(pred[i, GRAY])))
        bce -= y * math.log(p) + (1 - y) * math.log(1 - p)
    out["grayscale"] = bce / b
    return out


def _descriptors(b: int, g: torch.Generator) -> Tensor:
    w = torch.rand(b, 13, generator=g, dtype=torch.float64)
    w[:, 0] *= 2.0  # blur sigma, not normalised
    w[:, GRAY] = (torch.rand(b, generator=g) < 0.5).double()
    return w


def test_group_losses_match_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(8, 13, generator=g, dtype=torch.float64)
    w1, w2 = _descriptors(8, g), _descriptors(8, g)
    got = augself_group_losses(pred, w1, w2)
    ref = naive_losses(pred, w1, w2)
    assert list(got) == ["blur", "color", "color_diff", "crop", "grayscale"]
    for k in ref:
        assert got[k].item() == pytest.approx(ref[k], rel=1e-12), k
    weights = {"crop": 2.0, "blur": 0.0}
    total = sum(weights.get(k, 1.0) * v for k, v in ref.items())
    assert augself_loss(pred, w1, w2, weights=weights).item() == pytest.approx(total, rel=1e-12)


def test_head_is_symmetric_and_trains_features() -> None:
    torch.manual_seed(0)
    head = AugSelfHead(dim=6, hidden=16)
    f1 = torch.randn(4, 6, requires_grad=True)
    f2 = torch.randn(4, 6, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    w1, w2 = _descriptors(4, g).float(), _descriptors(4, g).float()
    loss = head(f1, f2, w1, w2)
    # symmetric: both orders of the pair, each with its own difference
    pred = torch.cat([head.predict(f1, f2), head.predict(f2, f1)])
    expected = augself_loss(pred, torch.cat([w1, w2]), torch.cat([w2, w1]))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert f1.grad.abs().sum() > 0 and f2.grad.abs().sum() > 0
    one_way = AugSelfHead(dim=6, hidden=16, symmetric=False)
    assert one_way.predict(f1, f2).shape == (4, 13)


def test_identical_views_perfect_prediction_is_near_zero() -> None:
    w = torch.rand(3, 13)
    pred = torch.zeros(3, 13)
    pred[:, GRAY] = 30.0  # confident "views agree"
    losses = augself_group_losses(pred, w, w)
    assert all(v.item() < 1e-12 for v in losses.values())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: AugSelfHead(dim=4, descriptor_dim=12), "does not match layout v1"),
        (lambda: AugSelfHead(dim=4, version="v9"), "unknown augmentation descriptor version"),
        (lambda: AugSelfHead(dim=4, weights={"flip": 1.0}), "unknown AugSelf weight groups"),
        (  # the function too: a typo ("colour") left the color group at weight 1
            lambda: augself_loss(*torch.randn(3, 2, 13), weights={"colour": 0.0}),
            r"unknown AugSelf weight groups \['colour'\]",
        ),
        (
            lambda: augself_loss(torch.randn(2, 13), torch.randn(2, 12), torch.randn(2, 12)),
            r"expected \(\.\.\., 13\)",
        ),
        (
            lambda: augself_loss(torch.randn(2, 13), torch.randn(3, 13), torch.randn(2, 13)),
            "must all be",
        ),
        (
            lambda: AugSelfHead(dim=4).predict(torch.randn(2, 4), torch.randn(3, 4)),
            r"must both be \(B, dim\)",
        ),
    ],
)
def test_augself_bad_inputs(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
