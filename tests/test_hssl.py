"""Homomorphic SSL: local-window attention, lifting, equivariance, the identity, the exact case.

References are independent of the code under test: naive loops for the mask, the shift and
the fiber gather; the group action written with torch.roll / flip+transpose; the
augmentation-based SimCLR loss computed with two augmented forward passes.
"""

from __future__ import annotations

import pytest
import torch
from distributed_utils import run_distributed

import mmssl
from mmssl.models.config import VisionConfig
from mmssl.models.lifting import (
    remove_structure,
    rotate,
    rotation_lift,
    translate,
    translation_lift,
    unstructured_map,
)
from mmssl.models.vision import local_window_mask
from mmssl.objectives import nt_xent_loss
from mmssl.objectives.hssl import HSSLLoss, gather_fibers, hssl_loss, sample_fiber_pairs

PATCH, GRID = 4, 16  # 64x64 images -> a 16x16 token grid
DEPTH, WINDOW = 2, 1  # receptive radius R = DEPTH * WINDOW tokens


def _encoder(attn_window: int | None = WINDOW, **vision: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = {
        "image_size": PATCH * GRID,
        "patch_size": PATCH,
        "depth": DEPTH,
        "attn_window": attn_window,
        **vision,
    }
    enc = mmssl.create_model("test_tiny_vit_local", vision=cfg).visual.eval()
    with torch.no_grad():  # far from init, so attention is not near-uniform
        for p in enc.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return enc


def _grid(enc: torch.nn.Module, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        tokens = enc.forward_features(x, cond)["tokens"]
    return tokens.reshape(x.shape[0], GRID, GRID, -1)  # (B, G, G, D)


def _interior(g: int, radius: int) -> slice:
    """Positions u whose tokens in T_g x and u - g in x are both out of the border's reach."""
    return slice(radius + max(0, g), GRID - radius + min(0, g))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- the mask


@pytest.mark.parametrize("num_prefix", [0, 2])
def test_local_window_mask_matches_naive_loop(num_prefix):
    gh, gw, r = 3, 4, 1
    mask = local_window_mask(gh, gw, r, num_prefix, torch.device("cpu"))
    n = num_prefix + gh * gw
    ref = torch.ones(n, n, dtype=torch.bool)
    for i in range(gh * gw):
        for j in range(gh * gw):
            yi, xi, yj, xj = i // gw, i % gw, j // gw, j % gw
            ref[num_prefix + i, num_prefix + j] = max(abs(yi - yj), abs(xi - xj)) <= r
        ref[num_prefix + i, :num_prefix] = False
    assert torch.equal(mask, ref)


def test_attn_window_none_is_the_plain_encoder_and_window_covering_grid_equals_it():
    x = torch.randn(2, 3, PATCH * GRID, PATCH * GRID)
    plain, wide = _encoder(None), _encoder(GRID)  # same seed, same weights
    assert torch.allclose(_grid(plain, x), _grid(wide, x), atol=1e-5)
    assert _rel_err(_grid(_encoder(1), x), _grid(plain, x)) > 1e-2


# ----------------------------------------------------------------------------- translations


def test_translate_matches_roll_with_zero_fill():
    x = torch.randn(3, 2, 8, 12)
    shifts = torch.tensor([[1, -2], [0, 3], [-1, 0]])
    out = translate(x, shifts, patch_size=2)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        ref = torch.roll(x[i], (2 * dy, 2 * dx), dims=(-2, -1))
        rows, cols = torch.arange(8), torch.arange(12)
        keep = ((rows - 2 * dy >= 0) & (rows - 2 * dy < 8))[:, None] & (
            (cols - 2 * dx >= 0) & (cols - 2 * dx < 12)
        )[None]
        assert torch.equal(out[i], ref * keep)


@pytest.mark.parametrize("shift", [(1, 0), (0, -2), (2, 1), (-1, -1)])
def test_whole_patch_shift_equivariance_away_from_the_border(shift):
    x = torch.randn(2, 3, PATCH * GRID, PATCH * GRID)
    enc = _encoder()
    f, f_shifted = _grid(enc, x), _grid(enc, translate(x, torch.tensor(shift), PATCH))
    rows, cols = _interior(shift[0], DEPTH * WINDOW), _interior(shift[1], DEPTH * WINDOW)
    # Gamma_g f(x): the token grid moved by g (torch.roll, independent of `translate`)
    moved = torch.roll(f, shift, dims=(1, 2))
    assert _rel_err(f_shifted[:, rows, cols], moved[:, rows, cols]) < 1e-5


def test_global_attention_is_not_shift_equivariant():
    # why attn_window exists: with global attention every token sees the border
    x = torch.randn(2, 3, PATCH * GRID, PATCH * GRID)
    enc = _encoder(None)
    f, f_shifted = _grid(enc, x), _grid(enc, translate(x, torch.tensor((1, 0)), PATCH))
    s = _interior(1, DEPTH * WINDOW)
    assert _rel_err(f_shifted[:, s, s], torch.roll(f, (1, 0), dims=(1, 2))[:, s, s]) > 1e-3


def test_prefix_tokens_do_not_reach_patch_tokens_and_adaln_keeps_equivariance():
    x = torch.randn(2, 3, PATCH * GRID, PATCH * GRID)
    overrides = {"class_token": True, "pool": "token", "cond_dim": 8, "cond_tokens": 2}
    torch.manual_seed(0)
    model = mmssl.create_model(
        "test_tiny_vit_local",
        condition={"dim": 8},
        vision={"image_size": PATCH * GRID, "patch_size": PATCH, "depth": DEPTH, **overrides},
    )
    enc = model.visual.eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.3 * torch.randn_like(p))
    c = torch.randn(2, 8)
    f = _grid(enc, x, c)
    f_shifted = _grid(enc, translate(x, torch.tensor((1, 1)), PATCH), c)
    s = _interior(1, DEPTH * WINDOW)
    assert _rel_err(f_shifted[:, s, s], torch.roll(f, (1, 1), dims=(1, 2))[:, s, s]) < 1e-5
    # the class token still reads the whole image
    with torch.no_grad():
        pooled = enc.forward_features(x, c)["pooled"]
        x2 = x.clone()
        x2[..., :PATCH, :PATCH] += 1.0  # a far corner patch
        assert _rel_err(enc.forward_features(x2, c)["pooled"], pooled) > 1e-4


def test_translation_identity_f_Tg_x_at_e_equals_f_x_at_g_inverse():
    x = torch.randn(2, 3, PATCH * GRID, PATCH * GRID)
    enc, window, e = _encoder(), 4, torch.tensor([6, 6])
    lifted = translation_lift(_grid(enc, x).flatten(1, 2), (GRID, GRID), window)
    for g in [(2, -1), (-2, 2), (0, 1)]:
        g = torch.tensor(g)
        tokens = _grid(enc, translate(x, g, PATCH)).flatten(1, 2)
        at_e = translation_lift(tokens, (GRID, GRID), window)[:, 6, 6]  # f(T_g x)(e)
        at_g_inv = gather_fibers(lifted, (e - g).expand(2, 2))  # f(x)(g^-1), relative to e
        assert _rel_err(at_e, at_g_inv) < 1e-5


def test_translation_lift_is_the_naive_window_mean():
    tokens = torch.randn(2, 3 * 5, 4)
    lifted = translation_lift(tokens, (3, 5), 2)
    grid = tokens.reshape(2, 3, 5, 4)
    assert lifted.shape == (2, 2, 4, 4)
    for i in range(2):
        for j in range(4):
            assert torch.allclose(lifted[:, i, j], grid[:, i : i + 2, j : j + 2].mean((1, 2)))


# ----------------------------------------------------------------------------- C4 rotations


def _quarter_turn(x: torch.Tensor, k: int) -> torch.Tensor:
    """Counter-clockwise quarter turns written as transpose + flip (not rot90)."""
    for _ in range(k % 4):
        x = x.transpose(-2, -1).flip(-2)
    return x


def test_rotate_is_a_counter_clockwise_quarter_turn():
    x = torch.randn(2, 3, 5, 5)
    for k in range(-1, 5):
        assert torch.equal(rotate(x, k), _quarter_turn(x, k))


def test_c4_lift_equivariance_and_identity():
    enc = _encoder(None)
    x = torch.randn(3, 3, PATCH * GRID, PATCH * GRID)

    def encode(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return enc.forward_features(v)["pooled"]

    lifted = rotation_lift(encode, x)  # (B, 4, D)
    naive = torch.stack([encode(_quarter_turn(x, -g)) for g in range(4)], dim=1)
    assert _rel_err(lifted, naive) < 1e-5
    assert _rel_err(lifted[:, 1], lifted[:, 0]) > 1e-2  # the encoder alone is not invariant
    for h in range(1, 4):
        lifted_h = rotation_lift(encode, _quarter_turn(x, h))
        assert _rel_err(lifted_h, torch.roll(lifted, h, dims=1)) < 1e-5  # Gamma_h: cyclic shift
        assert _rel_err(lifted_h[:, 0], lifted[:, (-h) % 4]) < 1e-5  # f(T_h x)(e) = f(x)(h^-1)
        if h != 2:  # the other direction is wrong (for h = 2 both coincide)
            assert _rel_err(lifted_h, torch.roll(lifted, -h, dims=1)) > 1e-2


# ----------------------------------------------------------------------------- ablation


def test_structure_removed_keeps_shape_and_norm_but_breaks_the_group_action():
    enc = _encoder(None)
    x = torch.randn(3, 3, PATCH * GRID, PATCH * GRID)

    def encode(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return enc.forward_features(v)["pooled"]

    lifted = rotation_lift(encode, x)
    mixed = remove_structure(lifted, seed=3)
    m = unstructured_map(4, 3)
    assert mixed.shape == lifted.shape
    assert torch.allclose(m @ m.T, torch.eye(4), atol=1e-5)
    assert torch.allclose(mixed.norm(dim=1), lifted.norm(dim=1), atol=1e-4)
    assert torch.allclose(mixed, remove_structure(lifted, seed=3))  # fixed, not resampled
    mixed_h = remove_structure(rotation_lift(encode, rotate(x, 1)), seed=3)
    assert _rel_err(mixed_h, torch.roll(mixed, 1, dims=1)) > 0.1


# ----------------------------------------------------------------------------- objective


def test_gather_fibers_matches_indexing():
    lifted = torch.randn(4, 3, 5, 2)
    index = torch.tensor([[0, 0], [2, 4], [1, 3], [2, 0]])
    out = gather_fibers(lifted, index)
    for b, (i, j) in enumerate(index.tolist()):
        assert torch.equal(out[b], lifted[b, i, j])


def test_sample_fiber_pairs_ranges_and_displacement():
    gen = torch.Generator().manual_seed(0)
    i1, i2 = sample_fiber_pairs(4000, (5, 3), None, gen)
    for idx in (i1, i2):
        assert idx.min() == 0 and (idx.max(0).values == torch.tensor([4, 2])).all()
    # independent: every fiber about equally often (1/15 each)
    counts = torch.bincount(i2[:, 0] * 3 + i2[:, 1], minlength=15).float() / 4000
    assert (counts - 1 / 15).abs().max() < 0.02
    i1, i2 = sample_fiber_pairs(4000, (7, 7), 1, gen)
    assert (i1 - i2).abs().max() == 1
    assert ((i2 >= 0) & (i2 < 7)).all()
    # uniform within k on both sides of every axis (a one-sided window also has max 1)
    d = i2 - i1
    assert d.min() == -1 and d.float().mean(0).abs().max() < 0.05
    i1, i2 = sample_fiber_pairs(100, (4,), 0, gen)
    assert torch.equal(i1, i2)


def test_exact_case_hssl_equals_augmentation_based_simclr():
    """Views T_g x (whole-patch shifts), each encoded as its window at e, versus the fibers at
    e - g of one forward pass: losses and parameter gradients agree."""
    torch.manual_seed(1)
    enc = _encoder()
    head = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    b, window, e = 8, 4, torch.tensor([6, 6])
    x = torch.randn(b, 3, PATCH * GRID, PATCH * GRID)
    g1, g2 = torch.randint(-2, 3, (b, 2)), torch.randint(-2, 3, (b, 2))
    assert not torch.equal(g1, g2)

    def lift(images: torch.Tensor) -> torch.Tensor:
        return translation_lift(enc.forward_features(images)["tokens"], (GRID, GRID), window)

    def grads() -> list[torch.Tensor]:
        out = [p.grad.clone() for p in enc.parameters() if p.grad is not None]
        enc.zero_grad(set_to_none=True)
        return out

    z1 = head(lift(translate(x, g1, PATCH))[:, 6, 6])
    z2 = head(lift(translate(x, g2, PATCH))[:, 6, 6])
    aug = nt_xent_loss(z1, z2, 0.2)
    aug.backward()
    aug_grads = grads()

    lifted = lift(x)
    f1, f2 = gather_fibers(lifted, e - g1), gather_fibers(lifted, e - g2)
    hssl = nt_xent_loss(head(f1), head(f2), 0.2)
    hssl.backward()
    hssl_grads = grads()
    assert abs(hssl.item() - aug.item()) < 1e-5
    assert aug.item() > 0.5  # not a degenerate value
    for a, h in zip(aug_grads, hssl_grads, strict=True):
        assert torch.allclose(a, h, atol=1e-5, rtol=1e-4)
    assert torch.allclose(hssl_loss(lifted, e - g1, e - g2, 0.2), nt_xent_loss(f1, f2, 0.2))


def test_hssl_loss_module_single_process_is_nt_xent():
    lifted = torch.randn(6, 3, 3, 8)
    loss = HSSLLoss(displacement=1, temperature=0.3)
    f1, f2 = loss.sample(lifted, torch.Generator().manual_seed(0))
    assert f1.shape == f2.shape == (6, 8)
    assert torch.allclose(loss(f1, f2), nt_xent_loss(f1, f2, 0.3))


def _rank_hssl(lifted: torch.Tensor, i1: torch.Tensor, i2: torch.Tensor) -> dict:
    from mmssl import distributed

    r, n = distributed.rank(), lifted.shape[0] // distributed.world_size()
    sl = slice(r * n, (r + 1) * n)
    out = {}
    for gather in ("local_loss", "full"):
        local = lifted[sl].clone().requires_grad_(True)
        loss = HSSLLoss(gather=gather)(gather_fibers(local, i1[sl]), gather_fibers(local, i2[sl]))
        loss.backward()
        out[gather] = (loss.detach(), local.grad / distributed.world_size())
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_equal_single_process():
    torch.manual_seed(0)
    lifted = torch.randn(8, 3, 3, 6)
    i1, i2 = sample_fiber_pairs(8, (3, 3), 1, torch.Generator().manual_seed(1))
    ref = lifted.clone().requires_grad_(True)
    ref_loss = hssl_loss(ref, i1, i2, 0.1)
    ref_loss.backward()
    results = run_distributed(_rank_hssl, 2, lifted, i1, i2)
    for r, per_mode in enumerate(results):
        for loss, grad in per_mode.values():
            assert torch.allclose(loss, ref_loss.detach(), atol=1e-6)
            assert torch.allclose(grad, ref.grad[4 * r : 4 * (r + 1)], atol=1e-6)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="attn_window must be >= 0"):
        VisionConfig(attn_window=-1)
    with pytest.raises(ValueError, match="cond_tokens"):
        VisionConfig(attn_window=1, class_token=False, pool="mean", cond_tokens=1, cond_dim=8)
    with pytest.raises(ValueError, match="window must be in 1..3"):
        translation_lift(torch.randn(1, 9, 2), (3, 3), 4)
    with pytest.raises(ValueError, match="grid 3x3 needs 9"):
        translation_lift(torch.randn(1, 8, 2), (3, 3), 2)
    with pytest.raises(ValueError, match="displacement must be >= 0"):
        sample_fiber_pairs(2, (3, 3), -1)
    with pytest.raises(ValueError, match="displacement must be >= 0"):
        HSSLLoss(displacement=-2)
    with pytest.raises(ValueError, match="fiber_shape"):
        sample_fiber_pairs(2, ())
    with pytest.raises(ValueError, match="out of range"):
        gather_fibers(torch.randn(2, 3, 3, 4), torch.tensor([[0, 3], [1, 1]]))
    with pytest.raises(ValueError, match=r"index must be \(B, 2\)"):
        gather_fibers(torch.randn(2, 3, 3, 4), torch.tensor([0, 1]))


def test_translate_refuses_fractional_shifts():
    x = torch.randn(2, 1, 4, 4)
    for shift in ([0.6, 0.0], [1.0, -1.5], torch.tensor([[0.0, 0.0], [0.5, 1.0]])):
        with pytest.raises(ValueError, match="shift must be whole patches"):
            translate(x, torch.as_tensor(shift))
    with pytest.raises(ValueError, match="shift must be whole patches"):
        translate(x, torch.tensor([float("inf"), 0.0]))
    # integral floats are whole shifts: the same as the int shift
    assert torch.equal(translate(x, torch.tensor([1.0, -1.0])), translate(x, torch.tensor([1, -1])))


def test_rotation_lift_refuses_non_square_images_and_unpooled_features():
    with pytest.raises(ValueError, match="square images, got 4x6"):
        rotation_lift(lambda v: v.flatten(1), torch.randn(2, 3, 4, 6))
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"return \(8, D\) for 8 images, got \(8, 16, 3\)"):
        rotation_lift(lambda v: v.flatten(2).transpose(1, 2), x)  # (4B, N, D) tokens
    with pytest.raises(ValueError, match=r"got \(2, 48\)"):
        rotation_lift(lambda v: v[:2].flatten(1), x)  # wrong row count
    assert rotation_lift(lambda v: v.flatten(1), x).shape == (2, 4, 48)


def test_unstructured_map_is_a_private_copy():
    # sizes and seeds no other test uses, so this test builds the cached matrix
    m = unstructured_map(5, 9001)
    m.zero_()  # a caller's in-place edit
    fresh = unstructured_map(5, 9001)
    assert torch.allclose(fresh @ fresh.T, torch.eye(5), atol=1e-5)


def test_unstructured_map_first_built_in_inference_mode_still_trains():
    lifted = torch.randn(2, 7, 3)
    with torch.inference_mode():  # e.g. an eval before the first training step
        ref = remove_structure(lifted, seed=9002)
    x = lifted.clone().requires_grad_()
    out = remove_structure(x, seed=9002)
    out.square().sum().backward()
    assert torch.allclose(out, ref)
    m = unstructured_map(7, 9002)  # d/dx sum((m x)^2) = 2 m^T m x = 2 x for orthogonal m
    assert torch.allclose(x.grad, 2 * lifted, atol=1e-5)
    assert not m.is_inference()


def test_cyclic_axes_wrap_the_displacement_around_the_group():
    """On a cyclic axis (the C4 axis of rotation_lift) "within k" wraps around: from fiber 0
    with k = 1 the second fiber is 3, 0 or 1, a third of the time each; compared with the
    naive set of fibers within k of the first.  A line axis beside it stays clamped."""
    gen = torch.Generator().manual_seed(0)
    n = 20000
    for size, k in [(4, 1), (4, 2), (7, 2), (5, 0)]:
        i1, i2 = sample_fiber_pairs(n, (size,), k, gen, cyclic=(True,))
        for f in range(size):
            allowed = {(f + o) % size for o in range(-k, k + 1)}
            counts = torch.bincount(i2[i1[:, 0] == f, 0], minlength=size).float()
            freq = counts / counts.sum()
            for g in range(size):
                assert abs(freq[g] - (1 / len(allowed) if g in allowed else 0.0)) < 0.03, (
                    size,
                    k,
                    f,
                    g,
                )
    i1, i2 = sample_fiber_pairs(n, (4, 5), 1, gen, cyclic=(True, False))
    assert ((i1[:, 0] == 0) & (i2[:, 0] == 3)).any()  # wrapped on the rotation axis
    assert (i2[:, 1] - i1[:, 1]).abs().max() == 1  # clamped on the line axis: 0 never meets 4
    lifted = torch.randn(n, 4, 3)
    f1, f2 = HSSLLoss(displacement=1).sample(
        lifted, torch.Generator().manual_seed(3), cyclic=(True,)
    )
    j1, j2 = sample_fiber_pairs(n, (4,), 1, torch.Generator().manual_seed(3), cyclic=(True,))
    assert torch.equal(f1, gather_fibers(lifted, j1)) and torch.equal(f2, gather_fibers(lifted, j2))
    with pytest.raises(ValueError, match="cyclic names 1 axes"):
        sample_fiber_pairs(2, (3, 3), 1, cyclic=(True,))


def test_fiber_indices_and_shifts_of_the_wrong_kind_are_named():
    with pytest.raises(ValueError, match="index must hold integers"):
        gather_fibers(torch.randn(2, 3, 4), torch.tensor([[0.0], [1.0]]))
    with pytest.raises(
        ValueError, match=r"shift must be \(2,\) or \(B, 2\) = \(2, 2\), got \(3,\)"
    ):
        translate(torch.randn(2, 1, 4, 4), torch.tensor([1, 0, 1]))
