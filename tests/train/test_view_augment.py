"""Asymmetric views: `data.view_augment` gives each view its own augmentation config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import RECIPES

from mmssl.data.augment import AugmentConfig, make_views
from mmssl.schema import ConfigError
from mmssl.train.recipe import load_recipe, validate
from mmssl.train.streams import augment_config

QUICK = str(RECIPES / "quickstart.yaml")
NO_AUG = dict(
    scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0
)


def test_view_augment_merges_over_augment() -> None:
    recipe = load_recipe(QUICK, ["data.augment.blur_p=0.0", "data.view_augment=[{}, {hue: 0.5}]"])
    first, second = augment_config(recipe)
    assert (first.hue, second.hue) == (0.0, 0.5)
    assert first.blur_p == second.blur_p == 0.0  # the shared settings reach both views


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.view_augment=[{}]", "data.view_augment has 1 entries; data.views is 2"),
        ("data.view_augment=[{}, {hue2: 0.5}]", "data.view_augment[1].hue2"),
        ("data.view_augment=[{}, {hue: 0.9}]", "hue"),
    ],
)
def test_bad_view_augment(override: str, message: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=message.replace("[", r"\[")):
        recipe = load_recipe(QUICK, [override])
        validate(recipe, 1, check_files=False)
        augment_config(recipe)


def test_each_view_uses_its_own_config() -> None:
    rng = np.random.default_rng(0)
    images = [torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8) for _ in range(4)]
    plain = AugmentConfig(**NO_AUG)
    gray = AugmentConfig(**{**NO_AUG, "grayscale_p": 1.0})
    (v1, v2), (d1, d2) = make_views(images, 2, 16, (plain, gray), rng)
    reference = torch.stack(images).float() / 255.0
    assert torch.allclose(v1, reference, atol=1e-6)  # untouched view
    weights = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601-2 luma, as torchvision
    luma = torch.einsum("bchw,c->bhw", reference, weights)
    assert torch.allclose(v2, luma[:, None].expand_as(v2), atol=2e-3)
    assert d1[:, 12].sum() == 0 and d2[:, 12].sum() == 4  # the grayscale flag per view
    with pytest.raises(ValueError, match="1 augment configs for 2 views"):
        make_views(images, 2, 16, (plain,), rng)


def test_pairwise_objectives_refuse_other_view_counts() -> None:
    """SimCLR's NT-Xent and AugSelf's descriptor difference are pairwise: a third view was
    rendered and silently dropped (`views[:2]`).  A recipe is refused at validation, naming
    why; a batch built by hand is refused by the Task rather than sliced."""
    import mmssl
    from mmssl.train.recipe import ObjectiveConfig
    from mmssl.train.tasks import Task

    with pytest.raises(ConfigError, match="data.views must be 0 or 2, got 3: simclr and augself"):
        validate(load_recipe(QUICK, ["data.views=3", "data.view_augment=[]"]), 1, check_files=False)
    g = torch.Generator().manual_seed(0)
    model = mmssl.create_model("test_tiny_simclr")
    objectives = {
        "head": ObjectiveConfig(type="simclr", source="digits", projector_dim=8),
        "augself": ObjectiveConfig(type="augself", source="digits", hidden=16),
        "simclr": ObjectiveConfig(type="simclr", source="digits"),  # the model's projector
    }
    for key, obj in objectives.items():
        task = Task(model, {key: obj})
        for n in (3, 1):
            views = [torch.rand(4, 3, 32, 32, generator=g) for _ in range(n)]
            batch = {"views": views, "aug": [torch.rand(4, 13, generator=g) for _ in views]}
            with pytest.raises(ValueError, match=f"objectives.{key}: .* exactly two views.* {n}$"):
                task({"digits": batch})
        two = {"views": views * 2, "aug": batch["aug"] * 2}  # two views still train
        assert torch.isfinite(task({"digits": two})[0])


def _recipe(model: str, objectives: dict, data: dict) -> dict:
    sources = {"train": {"urls": "synthetic", "kind": "image_text"}}
    return {
        "model": {"name": model},
        "data": {"sources": sources, "views": 2, **data},
        "objectives": objectives,
        "train": {"steps": 1, "global_batch_size": 4, "micro_batch_size": 4},
    }


@pytest.mark.parametrize(
    ("model", "objectives", "reader"),
    [
        ("test_tiny_simclr", {"augself": {"source": "train"}}, r"objectives\.augself"),
        ("test_tiny_vit_cond", {"simclr": {"source": "train"}}, "descriptor conditioning"),
    ],
)
def test_solarize_is_refused_where_descriptors_are_read(model, objectives, reader) -> None:
    """The v1 descriptor has no solarize slot: a solarized view read as an unchanged one
    (its descriptor equal to the unsolarized view's, the image inverted above 0.5)."""
    from mmssl.train.recipe import recipe_from_dict

    def check(data: dict) -> None:
        validate(recipe_from_dict(_recipe(model, objectives, data)), 1, check_files=False)

    with pytest.raises(ConfigError, match=rf"data\.augment: solarize_p 0\.2 with .*{reader}"):
        check({"augment": {"solarize_p": 0.2}})
    with pytest.raises(ConfigError, match=r"data\.view_augment\[1\]: solarize_p 0\.2"):
        check({"view_augment": [{}, {"solarize_p": 0.2}]})
    check({"augment": {"solarize_p": 0.2}, "view_augment": [{"solarize_p": 0}] * 2})
    # a plain SimCLR model reads no descriptor: BYOL-style solarized views are fine; nor
    # does an augself of weight 0 (an ablation)
    ablated = _recipe("test_tiny_simclr", {"augself": {"source": "train", "weight": 0}}, {})
    ablated["objectives"]["simclr"] = {"source": "train"}
    ablated["data"]["augment"] = {"solarize_p": 0.2}
    validate(recipe_from_dict(ablated), 1, check_files=False)
    plain = _recipe("test_tiny_simclr", {"simclr": {"source": "train"}}, {})
    plain["data"]["augment"] = {"solarize_p": 0.2}
    validate(recipe_from_dict(plain), 1, check_files=False)
