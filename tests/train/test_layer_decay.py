"""optim.layer_decay (BEiT/MAE fine-tuning): each parameter's lr multiplier equals timm's
`param_groups_layer_decay` on the same ViT, each tower of a CLIP counts its own depth, and
the real engine's parameter groups carry lr x multiplier."""

from __future__ import annotations

import pytest
import torch

import mmssl
from mmssl.train.engine import param_groups
from mmssl.train.layer_decay import layer_scales

pytestmark = pytest.mark.usefixtures("one_process_group")


@pytest.mark.parametrize("pre_norm", [False, True])
def test_the_multipliers_equal_timms_on_the_same_vit(pre_norm):
    """A timm ViT imported: every mmssl parameter (found by its values) gets the lr_scale
    timm's own layer-decay groups give the timm parameter it came from (its norm_pre, open_clip's
    ln_pre, in the stem), but for the final norm, which timm puts with the last block and
    MAE's and BEiT's rule (ours) with the head."""
    from timm.models.vision_transformer import VisionTransformer
    from timm.optim import param_groups_layer_decay

    from mmssl.interop import load_timm_vit

    torch.manual_seed(0)
    peer = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                             num_classes=5, pre_norm=pre_norm)  # fmt: skip
    with torch.no_grad():
        for p in peer.parameters():  # every tensor its own values, to find it again
            p.normal_()
    names = {id(p): n for n, p in peer.named_parameters()}
    theirs = {
        names[id(p)]: g["lr_scale"]
        for g in param_groups_layer_decay(peer, weight_decay=0.05, layer_decay=0.7)
        for p in g["params"]
    }
    assert theirs["head.weight"] == 1.0 and theirs["blocks.2.mlp.fc1.weight"] == 0.7
    assert not pre_norm or theirs["norm_pre.weight"] == pytest.approx(0.7**4)
    model = load_timm_vit(peer)
    ours = layer_scales(model, 0.7)
    matched = set()
    for name, p in model.named_parameters():
        match = [n for n, q in peer.named_parameters() if q.numel() == p.numel() and torch.equal(
            q.detach().flatten(), p.detach().flatten())]  # fmt: skip
        assert len(match) == 1, name
        want = 1.0 if match[0].startswith("norm.") else theirs[match[0]]
        assert ours[name] == pytest.approx(want, rel=1e-12), (name, match[0])
        matched.add(match[0])
    assert matched == set(theirs) - {"head.weight", "head.bias"}  # the head is not imported
    assert theirs["norm.weight"] == pytest.approx(0.7)


def test_each_tower_counts_its_own_depth_and_the_engine_sets_each_groups_lr():
    from mmssl.train.engine import init_distributed, initialize
    from mmssl.train.loop import build_task
    from mmssl.train.recipe import recipe_from_dict, validate

    # no LM head (as clip_vit_b16): the token table is an embedding only
    model = mmssl.create_model("test_tiny_clip", **{"text.depth": 3, "text.lm_head": False})
    lv, lt = model.cfg.vision.depth, model.cfg.text.depth
    assert (lv, lt) == (2, 3)
    s = layer_scales(model, 0.5)
    assert s["visual.trunk.blocks.0.attn.qkv.weight"] == 0.5**lv
    assert s["visual.trunk.blocks.1.mlp.fc2.bias"] == 0.5
    assert s["visual.patch_embed.proj.weight"] == s["visual.pos_embed"] == 0.5 ** (lv + 1)
    assert s["text.trunk.blocks.0.norm1.weight"] == 0.5**lt
    assert s["text.token_embed.weight"] == 0.5 ** (lt + 1)
    assert s["visual.norm.weight"] == s["text.proj.weight"] == s["logit_scale"] == 1.0
    # without layer_decay: the two groups as before, no per-group lr
    assert [set(g) for g in param_groups(model, 0.1)] == [{"params", "weight_decay"}] * 2

    recipe = recipe_from_dict(
        {"optim": {"lr": 0.01, "layer_decay": 0.5, "impl": "torch"},
         "schedule": {"kind": "constant"},
         "model": {"overrides": {"text": {"depth": 3}}},
         "train": {"steps": 1, "global_batch_size": 4, "micro_batch_size": 4}}
    )  # fmt: skip
    resolved = validate(recipe, world_size=1)
    init_distributed()
    task = build_task(recipe, resolved.model)
    engine = initialize(task, recipe, resolved.ds_config)
    want = {f"model.{n}": v for n, v in layer_scales(task.model, 0.5).items()}
    names = {id(p): n for n, p in engine.module.named_parameters()}
    groups = engine.optimizer.param_groups
    assert groups[0]["lr"] == pytest.approx(0.01)  # the logged lr: the full-lr group's
    seen = 0
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            assert g["lr"] == pytest.approx(0.01 * want.get(name, 1.0), rel=1e-9), name
            skip = ("pos_embed", "token_embed.weight", "cls_token")
            decayed = p.ndim >= 2 and not name.endswith(skip)
            assert (g["weight_decay"] > 0) == decayed, name
            seen += 1
    assert seen == sum(1 for p in task.parameters() if p.requires_grad)


def test_bad_layer_decays_are_refused():
    from mmssl.schema import ConfigError
    from mmssl.train.recipe import recipe_from_dict, validate

    for bad in (0.0, 1.5, -0.5):
        with pytest.raises(ConfigError, match=r"optim.layer_decay must be in \(0, 1\]"):
            validate(recipe_from_dict({"optim": {"layer_decay": bad}}), world_size=1)
