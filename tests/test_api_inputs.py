"""Python-API inputs that were taken without a word or failed deep in torch: a cond given
to a model that nothing conditions, a projector cond of the wrong width, a batch of 0 with
condition tokens, an empty make_views batch, token ids that are no integers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmssl
from mmssl.data.augment import AugmentConfig, make_views


def test_a_cond_for_a_model_without_conditioner_is_refused() -> None:
    """It was dropped: the plain features came back for any cond, of any shape."""
    model = mmssl.create_model("test_tiny_clip").eval()
    images = torch.rand(2, 3, 32, 32)
    for call in (
        lambda: model.encode_image(images, cond=torch.randn(2, 64)),
        lambda: model.forward_features(images, cond=torch.randn(5, 7, 3)),
    ):
        with pytest.raises(ValueError, match="this model is not conditioned"):
            call()
    model.encode_image(images)  # cond=None stays the plain features


def test_conditioned_inputs_of_the_wrong_shape_are_named() -> None:
    model = mmssl.create_model("test_tiny_vit_cond").eval()
    c = model.condition(torch.rand(2, 13))
    pooled = model.forward_features(torch.rand(2, 3, 32, 32), c)["pooled"]
    assert model.project(pooled, c).shape[0] == 2
    with pytest.raises(ValueError, match=r"projector cond must be \(B or 1, \d+\), got \(2, 13\)"):
        model.project(pooled, torch.rand(2, 13))  # a descriptor, not the conditioner's c
    # a batch of 0 with its own (0, C) condition: the prefix tokens' reshape had no size
    empty = model.forward_features(torch.rand(0, 3, 32, 32), c[:0])
    assert empty["pooled"].shape == (0, model.visual.cfg.dim)


def test_make_views_of_no_images_is_a_batch_of_none() -> None:
    """It raised IndexError; the models take a batch of 0."""
    for backend in ("torch", "auto"):
        views, descs = make_views(
            [], 2, 16, AugmentConfig(backend=backend), np.random.default_rng(0)
        )
        assert [v.shape for v in views] == [(0, 3, 16, 16)] * 2
        assert [d.shape for d in descs] == [(0, 13)] * 2


def test_decode_refuses_ids_that_are_no_integers() -> None:
    from mmssl.tokenizer import get_tokenizer

    tok = get_tokenizer()
    ids = torch.tensor(tok.encode("hello world"))
    assert tok.decode(ids) == tok.decode(ids.tolist()) == tok.decode(ids.numpy()) == "hello world"
    with pytest.raises(TypeError, match="token ids must be integers, got "):
        tok.decode(ids.float() + 0.9)  # int() truncated these to the same text
    with pytest.raises(TypeError, match="token ids must be integers, got True"):
        tok.decode([True, 5])
    with pytest.raises(ValueError, match=r"decode takes one row of ids \(N,\), got shape \(1, 3\)"):
        tok.decode(ids[None])
