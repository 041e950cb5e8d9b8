"""Weight import from timm ViTs (ViT-S/16 and tiny variants): parity with timm, at the
built resolution and another, and the options and models it refuses by name.

(Peers seeded, 1-D parameters perturbed, fp32 parity: see interop_helpers.py.)
"""

from __future__ import annotations

import functools

import pytest
import torch
from interop_helpers import TOL, max_diff, perturb_

from mmssl.interop import load_timm_vit, timm_vit_config
from mmssl.models import resolve_model_config

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def vit_s16():
    torch.manual_seed(0)
    peer = perturb_(timm.create_model("vit_small_patch16_224", pretrained=False), seed=1)
    return peer, load_timm_vit(peer)


@pytest.mark.slow  # builds the full-size peer (module fixture)
def test_timm_vit_s16_config_is_the_registry_config(vit_s16):
    peer, model = vit_s16
    expected = resolve_model_config("vit_s16")
    assert model.cfg == expected
    assert timm_vit_config("vit_small_patch16_224") == expected  # built on meta, no weights


@pytest.mark.slow
def test_timm_vit_s16_features_parity(vit_s16):
    peer, model = vit_s16
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = peer.forward_features(images)  # (B, 1 + N, D), final norm included
        ref_pre_logits = peer.forward_head(ref, pre_logits=True)
        feats = model.forward_features(images)
    err_tokens = max_diff(feats["tokens"], ref[:, 1:])
    err_cls = max_diff(feats["pooled"], ref[:, 0])
    err_pre = max_diff(feats["pooled"], ref_pre_logits)
    print(
        f"timm vit_small_patch16_224: tokens {err_tokens:.3g}, cls {err_cls:.3g}, "
        f"pre-logits {err_pre:.3g}"
    )
    assert max(err_tokens, err_cls, err_pre) <= TOL


TINY_VITS = {
    "quickgelu_ls_prenorm_avg_nobias": dict(
        init_values=1e-5,
        qkv_bias=False,
        global_pool="avg",
        fc_norm=False,
        pre_norm=True,
        act_layer="quick_gelu",
        mlp_ratio=2.0,
    ),
    "no_class_token_avg": dict(class_token=False, global_pool="avg", fc_norm=False),
    # timm.layers.GELU, exact, no `approximate`: refused as "activation GELU" before
    "gelu_by_name": dict(act_layer="gelu"),
    # an nn.GELU module with the tanh approximation (a string act_layer makes another class)
    "gelu_tanh_module": dict(act_layer=functools.partial(torch.nn.GELU, approximate="tanh")),
}


@pytest.mark.parametrize("name", sorted(TINY_VITS))
def test_timm_tiny_variants_parity(name):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    peer = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=10,
        **TINY_VITS[name],
    )
    perturb_(peer, seed=1)
    model = load_timm_vit(peer)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = peer.forward_features(images)
        pre_logits = peer.forward_head(ref, pre_logits=True)
        feats = model.forward_features(images)
    err = max(
        max_diff(feats["tokens"], ref[:, peer.num_prefix_tokens :]),
        max_diff(feats["pooled"], pre_logits),
    )
    print(f"timm tiny {name}: {err:.3g}")
    assert err <= TOL


def test_timm_from_state_dict_needs_config_and_drops_only_the_head(tmp_path):
    torch.manual_seed(0)
    peer = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
    sd = peer.state_dict()
    with pytest.raises(ValueError, match="needs config="):
        load_timm_vit(sd)
    cfg = timm_vit_config(peer)
    model = load_timm_vit(sd, config=cfg)
    assert torch.equal(model.visual.trunk.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    sd["reg_token"] = torch.zeros(1, 4, 192)
    with pytest.raises(ValueError, match=r"1 timm keys have no mmssl counterpart: \['reg_token'\]"):
        load_timm_vit(sd, config=cfg)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reg_tokens=4), "register tokens"),
        (dict(global_pool="avg"), "fc_norm"),
        (dict(global_pool="map"), "attention pooling"),
        (dict(qk_norm=True), "q/k norm"),
        (dict(no_embed_class=True), "no_embed_class"),
    ],
)
def test_timm_unsupported_options_are_named(kwargs, match):
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        peer = VisionTransformer(
            img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, **kwargs
        )
    with pytest.raises(ValueError, match=match):
        timm_vit_config(peer)


def test_timm_not_a_vit():
    with pytest.raises(ValueError, match="is not a timm VisionTransformer"):
        timm_vit_config(torch.nn.Linear(2, 2))
    with torch.device("meta"):
        hybrid = timm.create_model("vit_small_r26_s32_224", pretrained=False)
    with pytest.raises(ValueError, match="HybridEmbed stem"):
        timm_vit_config(hybrid)


@pytest.mark.parametrize("size", [32, 96])
def test_timm_parity_at_another_resolution(size):
    # both resample the position table (antialiased bicubic) for a grid it was not built for
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    peer = VisionTransformer(
        img_size=64,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=0,
        dynamic_img_size=True,
    )
    peer = perturb_(peer, seed=1).eval()
    model = load_timm_vit(peer)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = peer.forward_head(peer.forward_features(x), pre_logits=True)
        assert max_diff(model.visual.forward_features(x)["pooled"], ref) <= TOL


def test_a_classifier_head_that_is_not_imported_is_said():
    """A fine-tuned timm classifier loads as an encoder of its pre-logits features: its head
    was dropped without a word, and `peer(x)`'s logits were nowhere."""
    import warnings

    from timm.models.vision_transformer import VisionTransformer

    from mmssl.interop import load_timm_vit

    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 1, "num_heads": 2}
    with pytest.warns(UserWarning, match=r"classifier head \(10 classes\) is not imported"):
        load_timm_vit(VisionTransformer(num_classes=10, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no head: nothing to say
        load_timm_vit(VisionTransformer(num_classes=0, **kw))
