"""Downstream features of a backbone conditioned on augmentation descriptors.

Training conditions every image (a plain one on the neutral descriptor, `mmssl.train.tasks`),
so cond=None must give the neutral descriptor's features on every path: the model, its
vision tower loaded alone (`load_encoder`), a copy of that tower (fine-tuning) and caption
generation.  Compared with the tower run on the conditioner's output for the hand-written
neutral descriptor of DESCRIPTOR_V1."""

from __future__ import annotations

import pytest
import torch

import mmssl
from mmssl.descriptor import DESCRIPTOR_V1
from mmssl.models.io import load_encoder, save_pretrained


def _trained_like(name: str, **overrides) -> mmssl.models.MultimodalModel:
    """A registry model with every weight moved off its init, the zero-initialised
    conditioning weights among them, as training moves them."""
    torch.manual_seed(0)
    model = mmssl.create_model(name, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def test_cond_none_is_the_neutral_descriptor_on_every_path(tmp_path):
    model = _trained_like("test_tiny_vit_cond")  # adaLN blocks and prefix tokens
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        neutral = torch.tensor([DESCRIPTOR_V1.neutral])
        want = model.visual.forward_features(images, model.conditioner(neutral))
        plain = model.visual.forward_features(images, None)
        assert (want["pooled"] - plain["pooled"]).abs().max() > 0.1  # the test can fail
        got = model.forward_features(images)
        for key in ("pooled", "tokens"):
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
        save_pretrained(model, tmp_path / "export")
        alone = load_encoder(tmp_path / "export")
        torch.testing.assert_close(alone.forward_features(images)["pooled"], want["pooled"])
        torch.testing.assert_close(alone.encode(images), model.encode_image(images))
        tuned = model.standalone_vision()  # a copy, as `mmssl eval finetune` trains
        torch.testing.assert_close(tuned.forward_features(images)["pooled"], want["pooled"])
        assert tuned is not model.visual and model.visual.cond_default is None  # left as it was
        torch.testing.assert_close(
            model.visual.forward_features(images, None)["pooled"], plain["pooled"]
        )
        # a condition given is used as given
        c = model.conditioner(torch.rand(3, 13))
        torch.testing.assert_close(
            alone.forward_features(images, c)["pooled"],
            model.visual.forward_features(images, c)["pooled"],
        )
    assert "cond_default" not in alone.state_dict()  # derived, not a weight


@pytest.mark.parametrize("name", ["test_tiny_vit", "test_tiny_clip"])
def test_cond_none_is_unchanged_without_backbone_conditioning(tmp_path, name):
    model = _trained_like(name)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = model.visual.forward_features(images, None)["pooled"]
        torch.testing.assert_close(model.forward_features(images)["pooled"], want, rtol=0, atol=0)
        save_pretrained(model, tmp_path / "export")
        got = load_encoder(tmp_path / "export").forward_features(images)["pooled"]
        torch.testing.assert_close(got, want)
    assert model.standalone_vision().cond_default is None


def test_captions_of_a_conditioned_model_read_the_neutral_features():
    cond = {"vision": {"cond_dim": 16}, "condition": {"dim": 16, "hidden_dim": 32}}
    model = _trained_like("test_tiny_coca", **cond)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        c = model.conditioner(torch.tensor([DESCRIPTOR_V1.neutral]).expand(2, -1))
        want = model.generate_captions(images, 5, bos_id=1, temperature=0.0, cond=c)
        got = model.generate_captions(images, 5, bos_id=1, temperature=0.0)
    assert torch.equal(got, want)
