"""omega_usage shuffles only each group's own descriptor dims, and each view is conditioned
on its own descriptor.  The reference is a stub model whose embedding reads exactly one
descriptor dim: shuffling any other dims cannot change its loss."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mmssl.eval.sensitivity import conditioned_simclr_loss, omega_usage
from mmssl.objectives import nt_xent_loss


class Stub:
    """Embedding = pooled image + 5 * descriptor dim `dim` (on every feature)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.projector = None
        self.visual = SimpleNamespace(proj=None)

    def condition(self, aug):
        return aug

    def forward_pooled(self, view, c=None):
        return view.flatten(1)[:, :6] + 5 * c[:, self.dim : self.dim + 1]


def _batches(n=3, b=8):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):  # both views share their descriptor: a shuffle breaks the pairs
        aug = torch.rand(b, 13, generator=g)
        out.append(([torch.rand(b, 3, 2, 2, generator=g) for _ in range(2)], [aug, aug.clone()]))
    return out


@pytest.mark.parametrize(
    "dim,moved,still",
    [
        (12, {"all", "grayscale"}, {"blur", "color", "color_diff", "crop", "hue"}),
        (0, {"all", "blur"}, {"grayscale", "color", "color_diff", "crop", "hue"}),
        (4, {"all", "color", "hue"}, {"blur", "grayscale", "color_diff", "crop"}),
        (3, {"all", "color"}, {"blur", "grayscale", "color_diff", "crop", "hue"}),  # saturation
        (5, {"all", "color_diff"}, {"blur", "grayscale", "color", "crop", "hue"}),  # red diff
    ],
)
def test_each_rise_shuffles_only_its_own_dims(dim, moved, still):
    res = omega_usage(Stub(dim), _batches(), temperature=0.5, seed=0)
    for name in still:
        assert res[f"rise/{name}"] == pytest.approx(0.0, abs=1e-6), name
    for name in moved:
        assert abs(res[f"rise/{name}"]) > 1e-3, name


def test_each_view_is_conditioned_on_its_own_descriptor():
    ((views, augs),) = _batches(1)
    augs = [augs[0], torch.rand(augs[0].shape)]  # views with different descriptors
    m = Stub(12)
    z = [m.forward_pooled(v, a) for v, a in zip(views, augs)]
    got = conditioned_simclr_loss(m, views, augs, 0.5)
    assert float(got) == pytest.approx(float(nt_xent_loss(z[0], z[1], 0.5)), abs=1e-6)


def test_figures_are_means_over_batches():
    bs = _batches(3)
    res = omega_usage(Stub(12), bs, temperature=0.5, seed=0)
    m = Stub(12)
    per = [float(conditioned_simclr_loss(m, v, a, 0.5)) for v, a in bs]
    assert res["loss"] == pytest.approx(sum(per) / 3, abs=1e-6)
