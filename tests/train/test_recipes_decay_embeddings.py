"""The recipes that follow OpenCLIP (CLIP, CoCa) and nanoGPT (GPT-2 124M) decay the token and
position tables as those do (their comments say so); the option's default keeps timm's rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmssl.train.recipe import OptimConfig, load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize("name", ["clip_vit_b16", "coca_vit_b16", "gpt_124m"])
def test_openclip_and_nanogpt_recipes_decay_the_tables(name):
    assert load_recipe(str(RECIPES / f"{name}.yaml")).optim.decay_embeddings is True


def test_the_default_keeps_timms_rule():
    assert OptimConfig().decay_embeddings is False
