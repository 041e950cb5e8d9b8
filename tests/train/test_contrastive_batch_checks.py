"""Recipe validation refuses contrastive setups with no real positive pair or no negatives.

References: the losses themselves at the refused settings (a batch of one gives NT-Xent and
CLIP exactly 0 with zero gradient; displacement 0 or one fiber gives identical positives).
"""

from __future__ import annotations

import pytest
import torch

from mmssl.objectives import nt_xent_loss
from mmssl.objectives.contrastive import clip_loss
from mmssl.objectives.hssl import sample_fiber_pairs
from mmssl.schema import ConfigError
from mmssl.train.recipe import recipe_from_dict, validate


def _hssl(**objective: object) -> dict:
    return {
        "model": {"name": "test_tiny_vit_local"},  # 32 px images, 8 px patches: a 4x4 grid
        "data": {"sources": {"train": {"kind": "image"}}},
        "objectives": {"hssl": dict(objective)},
        "train": {"global_batch_size": 4, "micro_batch_size": 4},
    }


def _check(data: dict, world_size: int = 1) -> None:
    validate(recipe_from_dict(data), world_size=world_size, check_files=False)


def test_the_refused_settings_are_degenerate():
    # why they are refused: the losses and the sampler at those settings
    a, b = torch.randn(1, 8, requires_grad=True), torch.randn(1, 8, requires_grad=True)
    for loss in (nt_xent_loss(a, b, 0.1), clip_loss(a, b, 10.0)):
        (grad,) = torch.autograd.grad(loss, a)
        assert loss.item() == 0.0 and not grad.any()
    i1, i2 = sample_fiber_pairs(50, (3, 3), 0)
    assert torch.equal(i1, i2)
    i1, i2 = sample_fiber_pairs(50, (1, 1), None)  # window == grid: one fiber
    assert torch.equal(i1, i2)


def test_hssl_recipe_refuses_displacement_0_and_a_window_equal_to_the_grid():
    _check(_hssl(window=3, displacement=1))  # 2x2 fibers, neighbours: fine
    _check(_hssl(window=3))
    with pytest.raises(ConfigError, match=r"^objectives\.hssl\.displacement 0 makes both"):
        _check(_hssl(displacement=0))
    with pytest.raises(ConfigError, match=r"^objectives\.hssl\.window 4 equals the 4x4 patch"):
        _check(_hssl(window=4))
    data = _hssl(window=2)
    data["data"]["image_size"] = 16  # a 2x2 grid
    with pytest.raises(ConfigError, match=r"^objectives\.hssl\.window 2 equals the 2x2 patch"):
        _check(data)


@pytest.mark.parametrize(
    "objectives",
    [
        {"clip": {}},
        {"siglip": {}},
        {"contrast": {"type": "simclr"}},
        {"next_token": {"weight": 0.5}, "clip": {"weight": 0.5}},
    ],
)
def test_contrastive_recipe_refuses_a_global_batch_of_1(objectives):
    data = {
        "model": {"name": "test_tiny_clip"},
        "data": {"sources": {"train": {}}, "views": 2 if "contrast" in objectives else 0},
        "objectives": objectives,
        "train": {"global_batch_size": 2, "micro_batch_size": 2},
    }
    _check(data)
    data["train"] = {"global_batch_size": 1, "micro_batch_size": 1}
    with pytest.raises(ConfigError, match=r"^train\.global_batch_size must be >= 2, got 1"):
        _check(data)
    # two ranks of one sample each: the loss gathers across ranks, so there are negatives
    data["train"] = {"global_batch_size": 2, "micro_batch_size": 1}
    _check(data, world_size=2)


def test_hssl_recipe_refuses_a_batch_of_1_even_with_accumulation():
    data = _hssl()
    data["train"] = {"global_batch_size": 1, "micro_batch_size": 1}
    with pytest.raises(ConfigError, match=r"^train\.global_batch_size must be >= 2"):
        _check(data)
    # each micro-batch is its own contrastive problem: accumulating four of one is no better
    data["train"] = {"global_batch_size": 4, "micro_batch_size": 1}
    with pytest.raises(ConfigError, match=r"^train\.micro_batch_size 1 x world size 1"):
        _check(data)


def test_a_batch_of_1_is_fine_without_a_contrastive_objective():
    data = {
        "model": {"name": "test_tiny_clip"},
        "data": {"sources": {"train": {"kind": "text"}}},
        "objectives": {"next_token": {}},
        "train": {"global_batch_size": 1, "micro_batch_size": 1},
    }
    _check(data)
    # a contrastive objective weighted 0 (an ablation) computes nothing either
    data["data"]["sources"]["train"]["kind"] = "image_text"
    data["objectives"] = {"next_token": {}, "clip": {"weight": 0.0}}
    _check(data)


def test_accumulating_a_contrastive_batch_is_said(caplog: pytest.LogCaptureFixture) -> None:
    """A recipe written for 64 GPUs run on 32 accumulated 2 micro-batches silently: its
    negatives were half the batch the recipe's comment promises (the loss is per micro-batch,
    see `mmssl.train.recipe`'s docstring)."""
    data = {
        "model": {"name": "test_tiny_clip"},
        "data": {"sources": {"train": {"urls": "synthetic"}}},
        "objectives": {"clip": {}, "lm": {"type": "next_token", "weight": 0.5}},
        "train": {"global_batch_size": 8, "micro_batch_size": 2},
    }
    with caplog.at_level("WARNING", logger="mmssl.train"):
        _check(data, world_size=4)  # 2 x 4 ranks: the whole batch, said nothing
        assert "contrastive" not in caplog.text
        _check(data, world_size=2)
    assert (
        "objectives.clip is contrastive and train.global_batch_size 8 is accumulated" in caplog.text
    )
    assert "one micro-batch across ranks (4 samples)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmssl.train"):  # next-token loss: exact
        _check({**data, "objectives": {"lm": {"type": "next_token"}}}, world_size=2)
    assert "accumulated" not in caplog.text
