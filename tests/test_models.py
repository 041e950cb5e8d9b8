"""Every registry model: shapes, no NaN, gradients, checkpointing, round trips, causality;
text generation and the text tower's inputs; create_model's config errors and overrides; the
`mmssl` import, CLI dispatch and `mmssl smoke`.

(Conditioning and projectors are in test_models_condition.py, export and load in
test_models_export.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from model_helpers import small

import mmssl
from mmssl.models import MultimodalModel, resolve_model_config
from mmssl.models.io import load_pretrained, save_pretrained
from mmssl.nn import Block
from mmssl.schema import ConfigError

MODELS = mmssl.list_models()


def run_all_heads(model: MultimodalModel, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    if model.visual is not None:
        c = model.visual.cfg
        images = torch.randn(2, c.in_chans, c.image_size, c.image_size, generator=g)
        cond = model.condition(torch.rand(2, 13, generator=g))
        feats = model.forward_features(images, cond)
        out.update(
            pooled=feats["pooled"], tokens=feats["tokens"], image=model.encode_image(images, cond)
        )
        if model.projector is not None:
            out["projected"] = model.project(feats["pooled"], cond)
    if model.text is not None:
        c = model.text.cfg
        text = torch.randint(0, c.vocab_size, (2, min(c.context_length, 12)), generator=g)
        mask = torch.ones_like(text, dtype=torch.bool)
        mask[1, 8:] = False
        out["text"] = model.encode_text(text, mask)
        if c.lm_head:
            out["logits"] = model.lm_logits(text, mask)
        if model.caption is not None:
            out["caption"] = model.caption_logits(out["tokens"], text, mask)
    if model.logit_scale is not None:
        out["scale"] = model.logit_scale.exp() * F.cosine_similarity(out["image"], out["text"])
    return out


@pytest.mark.parametrize("name", MODELS)
def test_shapes_finite_and_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = small(name).train()
    if model.projector is not None and model.projector.hyper_weight is not None:
        # The hypernetwork coefficients get a gradient through W_k f, zero at init by design;
        # move off that point so the test is about the wiring.
        torch.nn.init.normal_(model.projector.hyper_weight.data, std=0.01)
    out = run_all_heads(model)
    cfg = model.cfg
    if model.visual is not None:
        v = cfg.vision
        n = (v.image_size // v.patch_size) ** 2
        assert out["tokens"].shape == (2, n, v.dim)
        assert out["pooled"].shape == (2, v.dim)
        assert out["image"].shape == (2, cfg.embed_dim or v.dim)
    if model.text is not None:
        assert out["text"].shape == (2, cfg.embed_dim or cfg.text.dim)
        if "logits" in out:
            assert out["logits"].shape == (2, 12, cfg.text.vocab_size)
    for key, value in out.items():
        assert torch.isfinite(value).all(), key
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not no_grad, f"parameters without gradient: {no_grad}"


@pytest.mark.parametrize("name", [n for n in MODELS if n.startswith("test_tiny")])
def test_gradient_checkpointing_gives_equal_outputs_and_grads(name):
    torch.manual_seed(0)
    plain = small(name).train()
    on = {
        k: {"grad_checkpointing": True}
        for k in ("vision", "text")
        if getattr(plain.cfg, k) is not None
    }
    ckpt = small(name, **on).train()
    ckpt.load_state_dict(plain.state_dict())
    a, b = run_all_heads(plain), run_all_heads(ckpt)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6)
    sum(v.pow(2).mean() for v in a.values()).backward()
    sum(v.pow(2).mean() for v in b.values()).backward()
    for (n, pa), pb in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("name", [n for n in MODELS if n.startswith("test_tiny")])
def test_state_dict_and_export_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = small(name).eval()
    other = MultimodalModel(model.cfg).eval()
    other.load_state_dict(model.state_dict())
    ref = run_all_heads(model)
    for key, value in run_all_heads(other).items():
        assert torch.equal(value, ref[key]), key
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    for key, value in run_all_heads(loaded).items():
        assert torch.equal(value, ref[key]), key
    if model.visual is not None:
        enc = mmssl.load_encoder(str(tmp_path), "vision")
        images = torch.randn(2, 3, 32, 32)
        assert torch.equal(
            enc.forward_features(images)["pooled"], model.forward_features(images)["pooled"]
        )


@pytest.mark.parametrize("name", [n for n in MODELS if resolve_model_config(n).text is not None])
def test_text_tower_is_causal(name):
    torch.manual_seed(0)
    model = small(name).eval()
    c = model.text.cfg
    text = torch.randint(0, c.vocab_size, (2, 12))
    t = 5
    changed = text.clone()
    changed[:, t + 1 :] = torch.randint(0, c.vocab_size, (2, 12 - t - 1))
    a = model.text.forward_tokens(text)
    b = model.text.forward_tokens(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


@pytest.mark.parametrize("name", ["test_tiny_coca", "test_tiny_coca_prefix"])
def test_caption_logits_never_see_their_target(name):
    """Position t predicts token t + 1: the tokens after t leave its logits unchanged.  A
    bidirectional text tower would show the decoder its target, so it is refused."""
    torch.manual_seed(0)
    model = mmssl.create_model(name).eval()
    image_tokens = model.forward_features(torch.randn(2, 3, 32, 32))["tokens"]
    text, t = torch.randint(0, 512, (2, 12)), 5
    changed = text.clone()
    changed[:, t + 1 :] = (text[:, t + 1 :] + 1) % 512
    a, b = model.caption_logits(image_tokens, text), model.caption_logits(image_tokens, changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=1e-6)
    with pytest.raises(ConfigError, match=r"text\.causal"):
        mmssl.create_model(name, text={"causal": False})


def test_vision_and_text_blocks_are_the_same_class():
    model = mmssl.create_model("test_tiny_coca")
    kinds = {type(b) for b in model.visual.trunk.blocks}
    kinds |= {type(b) for b in model.text.trunk.blocks}
    kinds |= {type(b) for b in model.caption.decoder.blocks}
    assert kinds == {Block}


def test_shared_trunk_has_one_parameter_set_and_both_modalities_train_it():
    torch.manual_seed(0)
    model = mmssl.create_model("test_tiny_clip_shared")
    assert model.visual.trunk is model.text.trunk
    separate = mmssl.create_model("test_tiny_clip")
    trunk_params = sum(p.numel() for p in model.visual.trunk.parameters())
    assert model.num_params() == separate.num_params() - trunk_params  # text trunk removed
    trunk = list(model.visual.trunk.parameters())
    model.encode_image(torch.randn(2, 3, 32, 32)).pow(2).sum().backward()
    from_image = [p.grad.clone() for p in trunk]
    model.zero_grad()
    model.encode_text(torch.randint(0, 512, (2, 8))).pow(2).sum().backward()
    from_text = [p.grad.clone() for p in trunk]
    assert all(g.abs().sum() > 0 for g in from_image)
    assert all(g.abs().sum() > 0 for g in from_text)
    # Text runs causally through the trunk, images bidirectionally.
    text = torch.randint(0, 512, (1, 8))
    changed = text.clone()
    changed[0, 5] = (text[0, 5] + 1) % 512
    a, b = model.text.forward_tokens(text), model.text.forward_tokens(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])


def test_an_override_given_dotted_and_nested_is_refused():
    """A recipe's `overrides: {vision.depth: 2}` plus the command line's
    model.overrides.vision.depth=4 (stored nested) built depth 2: the dotted key won."""
    from mmssl.train.recipe import override_error

    with pytest.raises(ConfigError, match="model.vision.depth is given twice") as err:
        mmssl.create_model("test_tiny_vit", **{"vision.depth": 2, "vision": {"depth": 4}})
    assert str(override_error(err.value)).startswith("model.overrides.vision.depth is given")
    both = mmssl.create_model("test_tiny_vit", **{"vision.depth": 3, "vision": {"dim": 64}})
    assert (both.cfg.vision.depth, both.cfg.vision.dim) == (3, 64)  # different keys: both apply
    with pytest.raises(ConfigError, match="model.vision.block.norm_eps is given twice"):
        mmssl.create_model(  # two dotted entries: the one applied last won
            "test_tiny_vit", **{"vision.block": {"norm_eps": 1e-6}, "vision.block.norm_eps": 1e-5}
        )


def test_greedy_generate_matches_step_by_step_argmax():
    torch.manual_seed(0)
    model = mmssl.create_model("test_tiny_gpt").eval()
    prompt = torch.randint(0, 512, (2, 4))
    out = model.text.generate(prompt, 6, temperature=0)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, model.lm_logits(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    sampled = model.text.generate(prompt, 6, top_k=1)  # top-1 sampling is greedy
    assert torch.equal(sampled, seq)


def test_unknown_model_and_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="vit_s16"):
        mmssl.create_model("vit_s61")
    with pytest.raises(ConfigError, match=r"model\.vision\.dpeth.*depth"):
        mmssl.create_model("test_tiny_vit", vision={"dpeth": 2})
    with pytest.raises(ConfigError, match=r"model\.vision\.depth"):
        mmssl.create_model("test_tiny_vit", **{"vision.depth": "two"})
    with pytest.raises(ConfigError, match="divisible"):
        mmssl.create_model("test_tiny_vit", vision={"image_size": 30})


def test_import_mmssl_does_no_work():
    code = (
        "import sys, mmssl; "
        "heavy = [m for m in ('torch', 'deepspeed', 'webdataset', 'tokenizers') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout
    assert out.stderr == ""


def test_cli_dispatch():
    from mmssl.cli import main

    assert main(["--help"]) == 0
    assert main(["no-such-command"]) == 2
    assert main(["smoke", "--model", "test_tiny_clip"]) == 0


@pytest.mark.parametrize("name", [m for m in MODELS if m.startswith("test_tiny")])
def test_smoke_reaches_every_parameter(name, capsys):
    """`mmssl smoke` runs every part of a model: conditioner, projector, caption decoder."""
    from mmssl.smoke import main

    assert main(["--model", name]) == 0
    n = sum(1 for p in mmssl.create_model(name).parameters() if p.requires_grad)
    assert f"{n}/{n} parameter tensors received a gradient" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--batch-size", "x"], "invalid int value"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--seed", str(2**70)], "--seed must fit in 64 bits"),
    ],
)
def test_smoke_bad_arguments_are_one_line(args, message, capsys):
    from mmssl.smoke import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", "test_tiny_clip", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_partial_section_override_keeps_the_fields_own_defaults():
    """text.block defaults to norm_eps 1e-5 (BlockConfig's class default is 1e-6); overriding
    one other block field must not reset it."""
    from mmssl.models import resolve_model_config

    for over in ({"text.block.act": "quick_gelu"}, {"text": {"block": {"act": "quick_gelu"}}}):
        cfg = resolve_model_config("clip_vit_b32", **over)
        assert cfg.text.block.act == "quick_gelu"
        assert cfg.text.block.norm_eps == 1e-5


def test_bf16_encoder_resamples_its_position_table_at_another_size():
    # a bf16 run with data.image_size != the model's: the CPU bicubic kernel has no bf16
    # version, so the table is resampled in fp32 and rounded back
    torch.manual_seed(0)
    model = mmssl.create_model("test_tiny_clip").visual.eval()
    with torch.no_grad():
        model.pos_embed.normal_()
    wide = model.grid + 2
    x = torch.randn(2, 3, wide * model.cfg.patch_size, wide * model.cfg.patch_size)
    rounded = mmssl.create_model("test_tiny_clip").visual.eval()
    rounded.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
    want = rounded._abs_pos(wide, wide, x.device).bfloat16()
    model.bfloat16()
    assert torch.equal(model._abs_pos(wide, wide, x.device), want)
    with torch.no_grad():
        out = model.forward_features(x.bfloat16())["pooled"].float()
        ref = rounded.forward_features(x)["pooled"]
    assert (out - ref).norm() / ref.norm() < 0.05


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=-3), "top_k"),
    ],
)
def test_generate_refuses_sampling_settings_without_a_meaning(kw, match):
    # temperature -1 would sample from softmax(-logits): the least likely tokens, silently
    model = mmssl.create_model("test_tiny_gpt").eval()
    with pytest.raises(ValueError, match=match):
        model.text.generate(torch.zeros(1, 2, dtype=torch.long), 1, **kw)


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        (torch.randint(0, 512, (8,)), ValueError, r"\(B, T\) token ids, got shape \(8,\)"),
        (torch.randint(0, 512, (2, 8)).float(), TypeError, "integer token ids.*float32"),
    ],
)
def test_text_tower_names_the_wrong_token_input(text, error, match):
    model = mmssl.create_model("test_tiny_clip")
    for call in (model.encode_text, model.lm_logits):
        with pytest.raises(error, match=match):
            call(text)


def test_text_mean_pool_ignores_padding() -> None:
    from mmssl.models.config import TextConfig
    from mmssl.models.text import TextTransformer

    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=50, context_length=8, dim=16, depth=1, num_heads=2, pool="mean")
    text = TextTransformer(cfg).eval()
    ids = torch.randint(1, 50, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    torch.testing.assert_close(
        text.forward_features(ids)["pooled"], text.forward_features(padded, mask)["pooled"]
    )


def test_the_logit_scale_starts_at_one_over_0_07() -> None:
    """CLIP's initial temperature: exp(logit_scale) = 1 / 0.07 (logit_scale_init is its log;
    the scale without the log, 14.3, exponentiated to 1.6e6)."""
    model = mmssl.create_model("test_tiny_clip")
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07)
