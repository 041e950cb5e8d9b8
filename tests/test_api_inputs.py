"""Python-API inputs that were taken without a word or failed deep in torch: a cond given
to a model that nothing conditions, a projector cond of the wrong width, a batch of 0 with
condition tokens, an empty make_views batch, token ids that are no integers, features in
another dtype than the model."""

from __future__ import annotations

import dataclasses

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


@pytest.mark.parametrize("causal", [True, False])
def test_a_left_padded_text_mask_is_refused(causal: bool) -> None:
    """A Hugging Face-style left-padded batch (padding_side='left') was encoded without a
    word: its rows' positions start at the padding and a causal token attends to it, so the
    embeddings were not those of the texts alone (cosine 0.71 in a review).  Right padding
    gives each text alone's embedding."""
    model = mmssl.create_model("test_tiny_clip").eval()
    if not causal:
        model.text.cfg = dataclasses.replace(model.text.cfg, causal=False)
    v = model.cfg.text.vocab_size
    lengths = [5, 3]
    ids = [torch.randint(1, v, (n,)) for n in lengths]
    right = torch.zeros(2, 8, dtype=torch.long)
    left = torch.zeros(2, 8, dtype=torch.long)
    for i, t in enumerate(ids):
        right[i, : len(t)], left[i, 8 - len(t) :] = t, t
    rmask, lmask = right != 0, left != 0
    with torch.no_grad():
        alone = torch.cat([model.encode_text(t[None]) for t in ids])
        torch.testing.assert_close(model.encode_text(right, rmask), alone, atol=1e-5, rtol=0)
        for call in (
            lambda: model.encode_text(left, lmask),
            lambda: model.encode_text(left, lmask.long()),  # a 0/1 attention_mask
            lambda: model.text.forward_features(left, lmask),
            lambda: model.lm_logits(left, lmask),
        ):
            with pytest.raises(ValueError, match=r"text_mask rows \[0, 1\] are left-padded"):
                call()
    # a False inside a row is no padding: open_clip's `text != 0` marks CLIP's "!" (id 0) so
    holed = rmask.clone()
    holed[0, 2] = False
    with torch.no_grad():
        assert model.encode_text(right, holed).shape == (2, model.cfg.embed_dim)


def test_a_cond_token_ids_or_an_image_of_the_wrong_kind_are_named() -> None:
    """Each failed deep in torch: "mat1 and mat2 must have the same dtype" for a cond in
    another dtype, "Expected tensor for argument #1 'indices' to have one of the following
    scalar types: Long, Int" for uint8 ids, ZeroDivisionError for an image of no pixels."""
    from mmssl.data.center import resize_center

    for overrides in ({}, {"vision": {"cond_dim": None, "cond_tokens": 2}}):  # adaLN, prefix
        model = mmssl.create_model("test_tiny_vit_cond", **overrides).eval()
        x = torch.rand(2, 3, 32, 32)
        c = model.condition(torch.rand(2, 13))
        for dtype in (torch.float64, torch.bfloat16):
            with pytest.raises(TypeError, match=f"cond are {dtype} but the model's weights"):
                model.forward_features(x, c.to(dtype))
            with pytest.raises(TypeError, match=f"projector cond are {dtype} but the model's"):
                model.project(model.forward_features(x, c)["pooled"], c.to(dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts it
            assert model.forward_features(x, c.bfloat16())["pooled"].shape[0] == 2
    model = mmssl.create_model("test_tiny_clip").eval()
    ids = torch.tensor([[1, 67, 300, 2]])
    for dtype in (torch.uint8, torch.int16):
        with pytest.raises(TypeError, match=f"got {dtype}; convert with .long()"):
            model.encode_text(ids.to(dtype))
    torch.testing.assert_close(model.encode_text(ids.int()), model.encode_text(ids))
    with pytest.raises(ValueError, match="image 1 is 0x5 pixels: nothing to resize"):
        resize_center([torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(3, 0, 5).byte()], 8)
