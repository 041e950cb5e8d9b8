"""timm ViTs built with torch's nn.RMSNorm: parity with an explicit eps, refusals by name."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from mmssl.interop import load_timm_vit, timm_vit_config

timm = pytest.importorskip("timm")


def tiny_vit(norm_layer, device: str = "cpu"):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    with torch.device(device):
        return VisionTransformer(
            img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, norm_layer=norm_layer
        ).eval()


def test_timm_rmsnorm_with_an_explicit_eps_matches_timm():
    peer = tiny_vit(functools.partial(nn.RMSNorm, eps=1e-6))
    for m in peer.modules():  # ones at init: a weight mix-up would not show
        if isinstance(m, nn.RMSNorm):
            nn.init.normal_(m.weight, 1.0, 0.2)
    model = load_timm_vit(peer)
    assert model.cfg.vision.block.norm == "rmsnorm"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, feats = peer.forward_features(images), model.forward_features(images)
    torch.testing.assert_close(feats["tokens"], ref[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats["pooled"], ref[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "norm_layer, match",
    [
        # eps=None: torch takes finfo(dtype).eps, so no one float eps equals it (it crashed
        # in float(None))
        (nn.RMSNorm, r"RMSNorm\(eps=None\) as final norm"),
        # no weight: the conversion reported missing norm weights instead
        (
            functools.partial(nn.RMSNorm, eps=1e-6, elementwise_affine=False),
            "non-affine RMSNorm as final norm",
        ),
    ],
)
def test_timm_rmsnorm_without_an_eps_or_a_weight_is_refused_by_name(norm_layer, match):
    with pytest.raises(ValueError, match=match):
        timm_vit_config(tiny_vit(norm_layer, device="meta"))
    with pytest.raises(ValueError, match=match):
        load_timm_vit(tiny_vit(norm_layer))
