"""Conditioning and structured objectives against their papers' definitions.

Each reference is written out by hand from the paper (or its released code), independent of
the module under test: DiT's adaLN block (with mmssl's documented 1 + alpha gate), CASSLE's
projector on [f; gamma(omega)], AugSelf's `extract_diff` targets from raw view parameters,
and the H-SSL translation action on the whole lifted map.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import mmssl
from mmssl.data.augment import AugmentConfig, apply_params, sample_params
from mmssl.descriptor import DESCRIPTOR_V1
from mmssl.models.condition import Projector
from mmssl.models.lifting import translate, translation_lift
from mmssl.nn.block import Block
from mmssl.objectives.augself import augself_targets


def test_adaln_block_is_the_dit_formula_with_a_one_plus_alpha_gate():
    """x + (1 + a1) attn(LN(x)(1 + s1) + b1), then the same for the MLP; (b, s, a) = W SiLU(c)."""
    torch.manual_seed(0)
    dim, cond_dim = 16, 8
    blk = Block(dim, 2, cond_dim=cond_dim).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x, c = torch.randn(3, 5, dim), torch.randn(3, cond_dim)

    def affine(lin: torch.nn.Linear) -> torch.Tensor:
        return F.silu(c) @ lin.weight.T + lin.bias  # (B, out)

    def branch(x, norm, gate, fn):
        shift, scale = affine(norm.modulation).chunk(2, dim=-1)
        h = F.layer_norm(x, (dim,), norm.weight, norm.bias, 1e-6)
        return (1 + affine(gate.gate)[:, None]) * fn(h * (1 + scale[:, None]) + shift[:, None])

    with torch.no_grad():
        ref = x + branch(x, blk.norm1, blk.gate1, blk.attn)
        ref = ref + branch(ref, blk.norm2, blk.gate2, blk.mlp)
        torch.testing.assert_close(blk(x, c), ref, atol=1e-6, rtol=1e-5)


def test_cassle_projector_is_an_mlp_on_features_concatenated_with_gamma_omega():
    """CASSLE: z = MLP([f; gamma(omega)]); the backbone never sees omega."""
    torch.manual_seed(0)
    model = mmssl.create_model(
        "test_tiny_simclr", condition={"dim": 16}, projector={"cond": "concat"}
    ).eval()
    proj = model.projector
    with torch.no_grad():
        proj.cond_in.weight.normal_()  # away from the zero init, so gamma(omega) matters
    images, aug = torch.randn(2, 3, 32, 32), torch.rand(2, 13)
    with torch.no_grad():
        c = model.condition(aug)
        feats = model.forward_features(images, c)
        assert torch.equal(feats["pooled"], model.forward_features(images)["pooled"])
        f = feats["pooled"]
        w = torch.cat([proj.fc1.weight, proj.cond_in.weight], dim=1)  # first layer on [f; c]
        h = torch.cat([f, c], dim=1) @ w.T + proj.fc1.bias
        torch.testing.assert_close(model.project(f, c), proj.rest(h))


def test_augself_targets_are_extract_diff_of_the_raw_view_parameters():
    """AugSelf's `extract_diff`: crop = centre (y, x mirrored when flipped) and size
    differences, colour = factor differences, blur = sigma difference; view 1 minus view 2."""
    rng = np.random.default_rng(0)
    cfg = AugmentConfig(backend="torch", flip_p=0.5, grayscale_p=0.5)
    b, hw = 16, (40, 48)
    images = [torch.randint(0, 256, (3, *hw), dtype=torch.uint8) for _ in range(b)]
    p1, p2 = (sample_params(rng, [hw] * b, cfg) for _ in range(2))
    _, w1 = apply_params(images, p1, 24, backend="torch")
    _, w2 = apply_params(images, p2, 24, backend="torch")
    target = augself_targets(w1, w2, DESCRIPTOR_V1)

    def raw(p):
        top, left, h, w = (p.box[:, k] / hw[k % 2] for k in range(4))
        cx = left + w / 2
        cx = np.where(p.flip, 1 - cx, cx)
        color = np.where(p.jitter[:, None], p.factors - [1, 1, 1, 0], 0.0)
        return {
            "crop": np.stack([top + h / 2, cx, h, w], 1),
            "color": color,
            "blur": p.sigma[:, None],
        }

    r1, r2 = raw(p1), raw(p2)
    for name in ("crop", "color", "blur"):
        got = target[:, DESCRIPTOR_V1.group(name).slice].double()
        torch.testing.assert_close(got, torch.from_numpy(r1[name] - r2[name]), atol=1e-6, rtol=0)
    agree = torch.from_numpy(p1.gray == p2.gray).float()
    assert torch.equal(target[:, 12], agree)


def test_one_patch_shift_moves_the_whole_lifted_map():
    """L(T_g x)(u) = L(x)(u - g) for every window out of the border's reach (H-SSL)."""
    patch, grid, depth, attn_window, window = 4, 12, 2, 1, 3
    torch.manual_seed(0)
    enc = mmssl.create_model(
        "test_tiny_vit_local",
        vision={
            "image_size": patch * grid,
            "patch_size": patch,
            "depth": depth,
            "attn_window": attn_window,
        },
    ).visual.eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 3, patch * grid, patch * grid)
    reach = depth * attn_window  # receptive radius of a token, in patches

    def lift(images):
        with torch.no_grad():
            return translation_lift(enc.forward_features(images)["tokens"], (grid, grid), window)

    lifted = lift(x)
    n = grid - window + 1
    for g in [(1, 0), (0, 1), (-1, 0), (0, -1), (1, -1)]:
        shifted = lift(translate(x, torch.tensor(g), patch))
        checked = 0
        for u0 in range(n):
            for u1 in range(n):
                # every token of the window, here and at u - g, is out of the border's reach
                ok = all(
                    reach + max(0, s) <= u <= grid - window - reach + min(0, s)
                    for u, s in ((u0, g[0]), (u1, g[1]))
                )
                if ok:
                    a, b = shifted[:, u0, u1], lifted[:, u0 - g[0], u1 - g[1]]
                    assert float((a - b).norm() / b.norm()) < 1e-5, (g, u0, u1)
                    checked += 1
        assert checked >= 16


def test_hypernetwork_projector_is_the_plain_projector_at_init():
    torch.manual_seed(0)
    plain = Projector(6, 5, 3)
    hyper = Projector(6, 5, 3, cond="hyper", cond_dim=4, hyper_rank=3)
    hyper.load_state_dict(plain.state_dict(), strict=False)
    f, c = torch.randn(2, 6), torch.randn(2, 4)
    assert torch.equal(hyper(f, c), plain(f))
