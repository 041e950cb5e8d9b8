"""optim.layer_decay: a ViT with a pre-norm (open_clip's ln_pre, timm's
norm_pre) gets timm's own multipliers (timm puts norm_pre in the stem, layer 0), and the
multipliers of CLIP, shared-trunk and CoCa models equal a naive per-name computation of
the documented rule."""

from __future__ import annotations

import re

import pytest
import torch

import mmssl
from mmssl.train.layer_decay import layer_scales


def test_a_pre_norm_vit_matches_timm():
    from timm.models.vision_transformer import VisionTransformer
    from timm.optim import param_groups_layer_decay

    from mmssl.interop import load_timm_vit

    torch.manual_seed(1)
    peer = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                             num_classes=5, pre_norm=True)  # fmt: skip
    with torch.no_grad():
        for p in peer.parameters():
            p.normal_()
    names = {id(p): n for n, p in peer.named_parameters()}
    theirs = {
        names[id(p)]: g["lr_scale"]
        for g in param_groups_layer_decay(peer, weight_decay=0.05, layer_decay=0.6)
        for p in g["params"]
    }
    assert theirs["norm_pre.weight"] == pytest.approx(0.6**5)  # timm: the stem
    model = load_timm_vit(peer)
    ours = layer_scales(model, 0.6)
    by_values = {}
    for name, p in model.named_parameters():
        match = [n for n, q in peer.named_parameters() if q.numel() == p.numel() and torch.equal(
            q.detach().flatten(), p.detach().flatten())]  # fmt: skip
        assert len(match) == 1, name
        by_values[name] = match[0]
    assert "norm_pre.weight" in by_values.values()
    for name, theirs_name in by_values.items():
        want = 1.0 if theirs_name.startswith("norm.") else theirs[theirs_name]  # documented
        assert ours[name] == pytest.approx(want, rel=1e-12), (name, theirs_name)


BLOCK = re.compile(r"^(?P<stack>.+)\.blocks\.(?P<i>\d+)\.")


def _naive(model, d):
    """The rule as the docs state it, computed independently: depth = number of distinct
    block indices of a stack; a tower's embeddings at d^(its depth + 1) (a tower without a
    stack of its own: the shared one); everything else at 1."""
    names = [n for n, _ in model.named_parameters()]
    blocks: dict[str, set[int]] = {}
    for n in names:
        if m := BLOCK.match(n):
            blocks.setdefault(m["stack"], set()).add(int(m["i"]))
    depth = {s: len(ix) for s, ix in blocks.items()}
    out = {}
    for n in names:
        if m := BLOCK.match(n):
            out[n] = d ** (depth[m["stack"]] - int(m["i"]))
        elif any(part in ("patch_embed", "cls_token", "pos_embed", "token_embed", "norm_pre")
                 for part in n.split(".")):  # fmt: skip
            tower = n.split(".")[0]
            own = [v for s, v in depth.items() if s.split(".")[0] == tower]
            (shared,) = own or list(depth.values())  # one stack a tower in these models
            out[n] = d ** (shared + 1)
        else:
            out[n] = 1.0
    return out


@pytest.mark.parametrize(
    ("name", "over"),
    [
        ("test_tiny_clip", {"vision.depth": 4, "text.depth": 1, "vision.pre_norm": True}),
        ("test_tiny_clip", {"vision.depth": 12, "text.depth": 3}),
        ("test_tiny_clip_shared", {}),
        ("test_tiny_coca", {}),
    ],
)
def test_the_multipliers_equal_a_naive_computation(name, over):
    model = mmssl.create_model(name, **over)
    ours = layer_scales(model, 0.75)
    want = _naive(model, 0.75)
    assert ours.keys() == want.keys()
    for n in want:
        assert ours[n] == pytest.approx(want[n], rel=1e-12), n
