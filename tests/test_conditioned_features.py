"""Downstream features of a backbone conditioned on augmentation descriptors.

Training conditions every image (a plain one on the neutral descriptor, `mmssl.train.tasks`),
so cond=None must give the neutral descriptor's features on every path: the model, its
vision tower loaded alone (`load_encoder`), a copy of that tower (fine-tuning) and caption
generation.  Compared with the tower run on the conditioner's output for the hand-written
neutral descriptor of DESCRIPTOR_V1."""

from __future__ import annotations

import copy

import pytest
import torch

import mmssl
from mmssl.descriptor import DESCRIPTOR_V1
from mmssl.models.io import load_encoder, save_pretrained
from mmssl.schema import ConfigError


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
    # the condition travels with the tower's state dict: loaded into a fresh tower (which
    # has none) it ran the plain path, up to 0.28 away, with "All keys matched"
    state = alone.state_dict()
    torch.testing.assert_close(state["cond_default"], alone.cond_default, rtol=0, atol=0)
    fresh = mmssl.create_model("test_tiny_vit_cond").visual.eval()
    assert fresh.cond_default is None
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.forward_features(images)["pooled"], want["pooled"])
    model.visual.load_state_dict(model.visual.state_dict(), strict=True)  # none: none kept
    assert model.visual.cond_default is None


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


def test_captions_of_a_conditioned_model_read_the_neutral_features() -> None:
    cond = {"vision": {"cond_dim": 16}, "condition": {"dim": 16, "hidden_dim": 32}}
    model = _trained_like("test_tiny_coca", **cond)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        c = model.conditioner(torch.tensor([DESCRIPTOR_V1.neutral]).expand(2, -1))
        want = model.generate_captions(images, 5, bos_id=1, temperature=0.0, cond=c)
        got = model.generate_captions(images, 5, bos_id=1, temperature=0.0)
    assert torch.equal(got, want)


def test_the_features_digest_covers_the_condition_of_a_conditioned_backbone() -> None:
    """A features file of a descriptor-conditioned backbone depends on the conditioner too:
    its digest changes with it (a changed conditioner's features were accepted as the same
    model's); an unconditioned model's digest is the vision weights' alone, as before."""
    from mmssl.eval.features_file import vision_digest

    model = _trained_like("test_tiny_vit_cond")
    before = vision_digest(model)
    with torch.no_grad():
        model.conditioner.net[-1].bias.add_(0.5)
    assert vision_digest(model) != before
    # of the weights and prompt that make the condition, not of its value, which an
    # accelerator computes otherwise than the CPU in its last bits (extracted on one, a
    # file was refused on the other)
    after = vision_digest(model)
    nudged = model.image_condition(None) * (1 + 1e-6)
    model.image_condition = lambda cond, device=None: nudged  # type: ignore[method-assign]
    assert vision_digest(model) == after
    model.cond_prompt = torch.tensor([[1, 5, 2]])
    with_prompt = vision_digest(model)
    model.cond_prompt = torch.tensor([[1, 6, 2]])
    assert len({after, with_prompt, vision_digest(model)}) == 3
    plain = _trained_like("test_tiny_vit")
    assert plain.image_condition(None) is None
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(plain.visual.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    assert vision_digest(plain) == h.hexdigest()


def test_a_finetuned_classifier_reloads_on_the_tower_load_encoder_gives(tmp_path):
    """`mmssl eval finetune` saves the Classifier's weights; rebuilt on
    `mmssl.load_encoder(EXPORT)` it gives the scored logits.  The weights carry the
    condition the tower was scored with, so a tower without one gives them too."""
    from safetensors.torch import load_file, save_file

    from mmssl.eval.finetune import Classifier

    model = _trained_like("test_tiny_vit_cond")
    save_pretrained(model, tmp_path / "export")
    model = load_encoder(tmp_path / "export", tower="model")
    clf = Classifier(model.standalone_vision(), 4).eval()  # as finetune builds it
    with torch.no_grad():
        clf.head.weight.normal_()
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, tmp_path / "ft.safetensors")
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        want = clf.logits(images)
        again = Classifier(load_encoder(tmp_path / "export"), 4).eval()
        again.load_state_dict(load_file(tmp_path / "ft.safetensors"))
        torch.testing.assert_close(again.logits(images), want, rtol=0, atol=0)
        bare = Classifier(copy.deepcopy(model.visual), 4).eval()
        bare.visual.cond_default = None  # the model's own tower, without its condition
        bare.load_state_dict(load_file(tmp_path / "ft.safetensors"))
        torch.testing.assert_close(bare.logits(images), want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"vision": {"cond_tokens": 0}}, {"vision": {"cond_dim": None, "cond_tokens": 2}}],
    ids=["adaLN and prefix tokens", "adaLN", "prefix tokens"],
)
def test_a_cond_the_tower_cannot_take_is_named(overrides):
    """A descriptor given where the tower takes the conditioner's c (or a c of another
    batch) failed deep in torch: "mat1 and mat2 shapes cannot be multiplied (2x13 and
    16x64)", "The expanded size of the tensor (2) must match"."""
    model = _trained_like("test_tiny_vit_cond", **overrides)
    images = torch.rand(2, 3, 32, 32)
    descriptor = torch.tensor([DESCRIPTOR_V1.neutral] * 2)
    c = model.condition(descriptor)
    width = c.shape[1]
    with torch.no_grad():
        for cond in (c, c[:1]):  # one per image, or one for all
            model.visual.forward_features(images, cond)
        for bad in (descriptor, c.repeat(2, 1)[:3], c[0]):
            with pytest.raises(ValueError, match=rf"cond must be \(B or 1, {width}\) for 2 images"):
                model.visual.forward_features(images, bad)
        with pytest.raises(ValueError, match="MultimodalModel.condition"):
            model.encode_image(images, descriptor)


def test_padded_prompt_gives_the_same_condition_as_the_prompt_alone() -> None:
    """MultimodalModel.condition(cond_text=..., cond_text_mask=...) pools the prompt with its
    padding mask, so a prompt padded to a longer length gives the same c as the prompt alone.
    Dropping the mask (pooling the pad positions) passes every existing test: the only test that
    passes cond_text_mask compares against condition() called the same way."""
    torch.manual_seed(0)
    model = mmssl.create_model(
        "test_tiny_clip", vision={"cond_dim": 16}, condition={"source": "text", "dim": 16}
    ).eval()
    vocab = model.text.cfg.vocab_size
    ids = torch.randint(1, vocab, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[:, :5] = True
    with torch.no_grad():
        alone = model.condition(cond_text=ids)
        with_pad = model.condition(cond_text=padded, cond_text_mask=mask)
        no_mask = model.condition(cond_text=padded)
    torch.testing.assert_close(with_pad, alone, atol=1e-5, rtol=1e-5)
    assert (no_mask - alone).abs().max() > 1e-4  # the padding would matter without the mask


def test_cond_none_on_prefix_token_tower_is_the_neutral_descriptor() -> None:
    """A vision tower conditioned ONLY through prefix tokens (cond_tokens > 0, cond_dim None)
    still gets the neutral descriptor's c for cond=None (MultimodalModel.image_condition docstring:
    "the neutral descriptor's c when the vision backbone is conditioned on augmentation
    descriptors"; training always conditions).  Checking only cond_dim would silently drop the
    prefix tokens at eval; no test exercises cond=None on a prefix-token-only tower."""
    torch.manual_seed(0)
    model = mmssl.create_model(
        "test_tiny_vit_cond", vision={"cond_dim": None, "cond_tokens": 2}
    ).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        for p in model.conditioner.parameters():
            p.normal_(0, 0.5)
        for p in model.visual.cond_prefix.parameters():
            p.normal_(0, 0.5)
        c = model.conditioner(torch.tensor([DESCRIPTOR_V1.neutral]))
        want = model.visual.forward_features(images, c)["pooled"]
        got = model.forward_features(images)["pooled"]
    torch.testing.assert_close(got, want)


def _text_conditioned(tmp_path, prompts: dict) -> tuple:
    """A trained-like text-conditioned model, exported with the prompts record of `prompts`
    ({source: ids})."""
    model = _trained_like(
        "test_tiny_clip", vision={"cond_dim": 16}, condition={"source": "text", "dim": 16}
    )
    record = {s: {"text": f"prompt of {s}", "ids": ids} for s, ids in prompts.items()}
    save_pretrained(model, tmp_path / "export", extra={"condition": {"prompts": record}})
    return model, tmp_path / "export"


def test_a_text_conditioned_export_gives_its_prompts_features_for_cond_none(tmp_path):
    """Training conditions every image on its source's prompt, and its tower never ran
    without it; the export named no prompt, and cond=None ran that never-trained path
    (the features and every eval).  Now the export records the prompt's ids."""
    ids = [1, 67, 300, 2]
    model, export = _text_conditioned(tmp_path, {"digits": ids, "more": ids})
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        want = model.visual.encode(images, model.condition(cond_text=torch.tensor([ids])))
        plain = model.visual.encode(images)
        assert (want - plain).abs().max() > 0.1  # the test can fail
        loaded = load_encoder(export, tower="model")
        torch.testing.assert_close(loaded.encode_image(images), want, rtol=0, atol=0)
        torch.testing.assert_close(load_encoder(export)(images), want, rtol=0, atol=0)
        c = loaded.condition(cond_text=torch.tensor([[1, 5, 2]]))  # a condition given: as given
        torch.testing.assert_close(loaded.encode_image(images, c), model.encode_image(images, c))
    # a prompt per source: no one condition is the plain one; said, and the plain path
    _, export = _text_conditioned(tmp_path / "two", {"digits": ids, "colours": [1, 9, 2]})
    with pytest.warns(UserWarning, match=r"a prompt per source \(colours, digits\)"):
        loaded = load_encoder(export, tower="model")
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), plain, rtol=0, atol=0)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompts": {"digits": {"text": "a", "ids": [1, 99999]}}}, r"ids in 0\.\.\d+"),
        ({"prompts": {"digits": {"text": "a", "ids": []}}}, "condition.prompts.digits must be"),
        ({"prompts": {"digits": {"text": "a", "ids": [1], "mask": [1]}}}, "unknown key"),
        ({"prompts": {}}, "'condition' must be"),
        ({"prompt": {"digits": {"text": "a", "ids": [1]}}}, "'condition' must be"),
    ],
)
def test_a_bad_condition_record_is_refused(tmp_path, record, message):
    model = mmssl.create_model(
        "test_tiny_clip", vision={"cond_dim": 16}, condition={"source": "text", "dim": 16}
    )
    with pytest.raises(ConfigError, match=message):
        save_pretrained(model, tmp_path / "export", extra={"condition": record})
    plain = mmssl.create_model("test_tiny_clip")  # a record of prompts for no text condition
    ok = {"prompts": {"digits": {"text": "a", "ids": [1, 2]}}}
    with pytest.raises(ConfigError, match="of a model conditioned on text"):
        save_pretrained(plain, tmp_path / "plain", extra={"condition": ok})


def test_the_carried_conditions_load_as_buffers_do(tmp_path):
    """cond_default and cond_prompt travel in state dicts while set (`mmssl.models.carried`):
    cast to the receiving module's dtype (a bf16 tower took an fp32 one and failed in torch),
    taken as saved with assign=True, refused where nothing reads them or the shape is wrong,
    and accepted by load_pretrained (a fine-tuned tower put back into its model, or a model
    saved after loading, was refused or lost its prompt)."""
    model = _trained_like("test_tiny_vit_cond")
    save_pretrained(model, tmp_path / "export")
    tower = load_encoder(tmp_path / "export")
    state = tower.state_dict()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = tower(images)
        half = mmssl.create_model("test_tiny_vit_cond").visual.to(torch.bfloat16).eval()
        half.load_state_dict(state)
        assert half.cond_default.dtype == torch.bfloat16
        torch.testing.assert_close(half(images.bfloat16()).float(), want, atol=0.1, rtol=0.05)
        with torch.device("meta"):
            empty = mmssl.create_model("test_tiny_vit_cond").visual.eval()
        empty.load_state_dict(state, assign=True)
        torch.testing.assert_close(empty(images), want, rtol=0, atol=0)
    plain = mmssl.create_model("test_tiny_vit").visual
    with pytest.raises(RuntimeError, match='Unexpected key.*"cond_default"'):
        plain.load_state_dict({**plain.state_dict(), "cond_default": state["cond_default"]})
    fresh = mmssl.create_model("test_tiny_vit_cond").visual
    with pytest.raises(RuntimeError, match=r"cond_default: torch.float32 \(1, 7\), this tower"):
        fresh.load_state_dict({**state, "cond_default": torch.zeros(1, 7)})
    # a fine-tuned tower (carrying its condition) put back into its model, saved, loaded
    whole = load_encoder(tmp_path / "export", tower="model")
    whole.visual.load_state_dict(state)
    save_pretrained(whole, tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(tmp_path / "again")(images), want)
    # a text-conditioned model saved after loading keeps its prompt; a state dict too
    ids = [1, 67, 300, 2]
    text_model, export = _text_conditioned(tmp_path / "text", {"digits": ids})
    loaded = load_encoder(export, tower="model")
    save_pretrained(loaded, tmp_path / "text-again")
    again = load_encoder(tmp_path / "text-again", tower="model")
    assert again.cond_prompt.tolist() == [ids]
    fresh_text = mmssl.create_model(
        "test_tiny_clip", vision={"cond_dim": 16}, condition={"source": "text", "dim": 16}
    )
    fresh_text.load_state_dict(loaded.state_dict())
    assert fresh_text.cond_prompt.tolist() == [ids]
    # token ids stay int64: only float carried buffers take the model's dtype (a bf16 model
    # made them bf16 floats, which the embedding refuses and which round ids past 256)
    assert fresh_text.cond_prompt.dtype == torch.int64
    half_text = mmssl.create_model(
        "test_tiny_clip", vision={"cond_dim": 16}, condition={"source": "text", "dim": 16}
    )
    half_text = half_text.to(torch.bfloat16).eval()
    half_text.load_state_dict(loaded.state_dict())
    assert half_text.cond_prompt.dtype == torch.int64 and half_text.cond_prompt.tolist() == [ids]
    with torch.no_grad():  # cond=None: the prompt's features, as the model had before saving
        prompt_c = text_model.condition(cond_text=torch.tensor([ids]))
        want_text = text_model.visual.encode(images, prompt_c)
        got = half_text.encode_image(images.bfloat16()).float()
        torch.testing.assert_close(got, want_text, atol=0.1, rtol=0.05)
    with pytest.raises(RuntimeError, match='Unexpected key.*"cond_prompt"'):
        mmssl.create_model("test_tiny_clip").load_state_dict(
            {
                **mmssl.create_model("test_tiny_clip").state_dict(),
                "cond_prompt": torch.tensor([ids]),
            }
        )
    with pytest.raises(RuntimeError, match=r"cond_prompt: .* not \(1, T\) token ids"):
        fresh_text.load_state_dict({**loaded.state_dict(), "cond_prompt": torch.tensor([[10**6]])})
