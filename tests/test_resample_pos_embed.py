"""resample_pos_embed (and VisionEncoder._abs_pos, which uses it) against timm's
resample_abs_pos_embed on the cases the repository's tests leave out: a non-square target
grid (an image of another aspect ratio), and a table without prefix rows (no class token)."""

from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed

import mmssl
from mmssl.models.vision import resample_pos_embed


@pytest.mark.parametrize("num_prefix", [0, 1, 2])
@pytest.mark.parametrize("size", [(3, 5), (6, 2), (7, 7)])
def test_matches_timm_on_any_target_grid_and_prefix(num_prefix, size):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1, num_prefix + 4 * 4, 8, generator=g)
    ours = resample_pos_embed(table, num_prefix, *size)
    want = resample_abs_pos_embed(table, list(size), num_prefix_tokens=num_prefix)
    assert ours.shape == (1, num_prefix + size[0] * size[1], 8)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[:, :num_prefix], table[:, :num_prefix], rtol=0, atol=0)


def test_non_square_grid_rows_are_row_major():
    """An analytic check, timm aside: a table that is a function of the row index only
    resamples to one whose rows stay constant along each grid row (row-major order)."""
    side, d = 4, 3
    rows = torch.arange(side, dtype=torch.float32).repeat_interleave(side)  # value = row
    table = torch.cat([torch.full((1, 1, d), 9.0), rows[None, :, None].expand(1, -1, d)], 1)
    out = resample_pos_embed(table, 1, 2, 6)[0, 1:, 0].reshape(2, 6)
    assert torch.allclose(out, out[:, :1].expand(2, 6), atol=1e-6)  # constant within a row
    assert out[0, 0] < out[1, 0]  # and increasing down the grid


@pytest.mark.parametrize("class_token", [True, False])
def test_encoder_table_for_a_non_square_image_is_timms(class_token):
    torch.manual_seed(0)
    model = mmssl.create_model(
        "test_tiny_vit",
        **{"vision.class_token": class_token, "vision.pool": "token" if class_token else "mean"},
    ).visual
    with torch.no_grad():
        model.pos_embed.normal_()
    prefix = 1 if class_token else 0
    assert model.num_prefix == prefix and model.pos_embed.shape[1] == prefix + model.grid**2
    gh, gw = model.grid - 1, model.grid + 2
    want = resample_abs_pos_embed(model.pos_embed.detach(), [gh, gw], num_prefix_tokens=prefix)
    got = model._abs_pos(gh, gw, torch.device("cpu"))
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-6)
    # and the forward takes such an image
    p = model.cfg.patch_size
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, gh * p, gw * p))
    assert out["tokens"].shape[1] == gh * gw
