"""Python-API inputs that were taken without a word or failed deep in torch: a cond given
to a model that nothing conditions, a projector cond of the wrong width, a batch of 0 with
condition tokens, an empty make_views batch, token ids that are no integers, features in
another dtype than the model."""

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
    # the tower alone, as load_encoder returns it, refuses one as well
    with pytest.raises(ValueError, match="this vision tower is not conditioned"):
        model.visual.forward_features(images, torch.randn(2, 64))


def test_conditioned_inputs_of_the_wrong_shape_are_named() -> None:
    model = mmssl.create_model("test_tiny_vit_cond").eval()
    c = model.condition(torch.rand(2, 13))
    pooled = model.forward_features(torch.rand(2, 3, 32, 32), c)["pooled"]
    assert model.project(pooled, c).shape[0] == 2
    with pytest.raises(ValueError, match=r"projector cond must be \(B or 1, \d+\) for 2 features"):
        model.project(pooled, torch.rand(2, 13))  # a descriptor, not the conditioner's c
    with pytest.raises(ValueError, match=r"projector cond must be \(B or 1, \d+\) for 2 features"):
        model.project(pooled, torch.cat([c, c, c]))  # 6 rows of c for 2 features
    # a tower the conditioner does not reach (projector-only conditioning) takes no cond;
    # the model passes the projector's condition past it
    projector_only = mmssl.create_model(
        "test_tiny_vit_cond", vision={"cond_dim": None, "cond_tokens": 0}
    ).eval()
    x, c = torch.rand(2, 3, 32, 32), projector_only.condition(torch.rand(2, 13))
    torch.testing.assert_close(
        projector_only.forward_features(x, c)["pooled"],
        projector_only.forward_features(x)["pooled"],
    )
    assert projector_only.project(projector_only.forward_features(x, c)["pooled"], c).shape[0] == 2
    with pytest.raises(ValueError, match="this vision tower is not conditioned"):
        projector_only.visual.forward_features(x, c)


def test_make_views_of_no_images_is_a_batch_of_none() -> None:
    """It raised IndexError; the models take a batch of 0."""
    for backend in ("torch", "auto"):
        views, descs = make_views(
            [], 2, 16, AugmentConfig(backend=backend), np.random.default_rng(0)
        )
        assert [v.shape for v in views] == [(0, 3, 16, 16)] * 2
        assert [d.shape for d in descs] == [(0, 13)] * 2
    with pytest.raises(ValueError, match="1 augment configs for 2 views"):  # checked all the same
        make_views([], 2, 16, [AugmentConfig()], np.random.default_rng(0))


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
    # integers of every kind are ids: 0-d tensors, numpy integers, an array.array
    import array

    assert tok.decode(list(ids)) == tok.decode([np.int64(i) for i in ids.tolist()]) == "hello world"
    assert tok.decode(array.array("l", ids.tolist())) == "hello world"
    with pytest.raises(TypeError, match="token ids must be integers, got tensor"):
        tok.decode([torch.tensor(1.5)])


def test_project_refuses_a_cond_on_a_model_without_conditioner():
    model = mmssl.create_model("test_tiny_simclr")
    assert model.conditioner is None and model.projector is not None
    pooled = torch.zeros(2, model.cfg.vision.dim)
    with pytest.raises(ValueError, match="not conditioned"):
        model.project(pooled, torch.zeros(2, 8))


def test_prefix_tokens_of_a_batch_of_none():
    from mmssl.models.condition import PrefixTokens

    tokens = PrefixTokens(cond_dim=4, num_tokens=3, dim=5)
    assert tokens(torch.zeros(0, 4)).shape == (0, 3, 5)


def test_inputs_in_another_dtype_than_a_bf16_model_are_named() -> None:
    """fp32 pooled features into a bf16 model's projector, or fp32 image tokens into its
    caption decoder, failed in torch with "mat1 and mat2 must have the same dtype" (images
    were already named); under autocast they run, and the model's own dtype runs."""
    for name, call in (
        ("test_tiny_simclr", lambda m, f: m.project(f["pooled"])),
        ("test_tiny_coca", lambda m, f: m.caption_logits(f["tokens"], torch.zeros(2, 4).long())),
    ):
        model = mmssl.create_model(name).to(torch.bfloat16).eval()
        size = model.cfg.vision.image_size
        feats = model.forward_features(torch.rand(2, 3, size, size).bfloat16())
        assert call(model, feats).dtype == torch.bfloat16
        fp32 = {k: v.float() for k, v in feats.items()}
        what = "pooled features" if name.endswith("simclr") else "image_tokens"
        with pytest.raises(TypeError, match=f"{what} are torch.float32 but the model's weights"):
            call(model, fp32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert call(model, fp32).dtype == torch.bfloat16


def test_token_ids_outside_the_vocabulary_are_named() -> None:
    """They failed in the embedding as a bare IndexError ("index out of range in self"): ids
    of the shipped tokenizer (8192) given to a text tower of another vocabulary."""
    model = mmssl.create_model("test_tiny_clip").eval()
    v = model.cfg.text.vocab_size
    ok = torch.randint(0, v, (2, 5))
    for bad_id in (v, v + 100, -1):
        text = ok.clone()
        text[1, 3] = bad_id
        for call in (model.encode_text, model.lm_logits, model.text.forward_pooled):
            with pytest.raises(ValueError, match=rf"token id {bad_id} is outside .* \[0, {v}\)"):
                call(text)
    edge = ok.clone()
    edge[0, 0], edge[1, 0] = 0, v - 1  # the first and last ids are in it
    assert torch.isfinite(model.encode_text(edge)).all()


def test_a_text_row_with_no_valid_token_is_refused_by_encode_text() -> None:
    """It was encoded: the row pooled a padding position and came back as an embedding."""
    model = mmssl.create_model("test_tiny_clip").eval()
    text = torch.randint(1, model.cfg.text.vocab_size, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2] = False
    with pytest.raises(ValueError, match="text_mask row 2 marks no token valid"):
        model.encode_text(text, mask)
    mask[2, 0] = True  # one token is enough
    assert model.encode_text(text, mask).shape == (3, model.cfg.embed_dim)
