"""Every registry model: shapes, no NaN, gradients, checkpointing, round trips, causality."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mmssl
from mmssl.models import MultimodalModel, resolve_model_config
from mmssl.models.io import load_pretrained, save_pretrained
from mmssl.nn import Block
from mmssl.schema import ConfigError

MODELS = mmssl.list_models()


def small(name: str, **extra) -> MultimodalModel:
    """The registry architecture with its depth cut to 1 and small inputs, so every shipped
    config is exercised quickly; the tiny test configs are built as they are."""
    over: dict = {}
    cfg = resolve_model_config(name)
    if not name.startswith("test_tiny"):
        if cfg.vision is not None:
            over["vision"] = {"depth": 1, "image_size": 2 * cfg.vision.patch_size}
        if cfg.text is not None:
            over["text"] = {"depth": 1, "context_length": 16}
        if cfg.caption is not None:
            over["caption"] = {"depth": 1}
    for key, value in extra.items():
        over.setdefault(key, {}).update(value)
    return mmssl.create_model(name, **over)


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


@pytest.mark.parametrize("projector", ["none", "concat", "film", "hyper"])
def test_zero_init_conditioned_model_equals_unconditioned(projector):
    """adaLN-Zero blocks and every conditioned projector equal the plain model at init."""
    torch.manual_seed(0)
    plain = mmssl.create_model("test_tiny_simclr").eval()
    cond = mmssl.create_model(
        "test_tiny_simclr",
        vision={"cond_dim": 16},
        condition={"dim": 16},
        projector={"cond": projector},
    ).eval()
    missing, unexpected = cond.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing
    images, aug = torch.randn(2, 3, 32, 32), torch.rand(2, 13)
    c = cond.condition(aug)
    ref = plain.forward_features(images)
    for out in (cond.forward_features(images, c), cond.forward_features(images, None)):
        assert torch.equal(out["pooled"], ref["pooled"])
        assert torch.equal(out["tokens"], ref["tokens"])
    z = cond.project(ref["pooled"], c)
    torch.testing.assert_close(z, plain.project(ref["pooled"]), atol=0, rtol=0)
    # Gradients reach the descriptor encoder gamma.  At the zero init, d(loss)/dc is zero
    # (every path from c is multiplied by a zero weight); the zero weights themselves get a
    # gradient, so from the second step on gamma does too.
    cond.train()
    opt = torch.optim.SGD(cond.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        c = cond.condition(aug)
        cond.project(cond.forward_features(images, c)["pooled"], c).pow(2).sum().backward()
        opt.step()
    gamma = cond.conditioner.net[0].weight.grad
    assert gamma is not None and gamma.abs().sum() > 0


@pytest.mark.parametrize(
    "where",
    [
        {"vision": {"cond_tokens": 2}},
        {"vision": {"cond_dim": 16}},
        {"projector": {"cond": "hyper"}},
    ],
)
def test_one_prompt_condition_serves_every_image(where):
    """A text-conditioned model's documented downstream call, `model.condition(cond_text=ids)`
    for one prompt, gives c (1, C); every image of the batch is then conditioned on it, the
    same as on c repeated per image (prefix tokens used to fail to concatenate)."""
    torch.manual_seed(0)
    model = mmssl.create_model(
        "test_tiny_clip",
        condition={"source": "text", "dim": 16},
        projector={"hidden_dim": 8, "out_dim": 4, **where.get("projector", {})},
        vision=where.get("vision", {}),
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # the zero-initialised conditioning, so that c matters
                p.normal_(std=0.05)
    c = model.condition(cond_text=torch.randint(1, 512, (1, 6)))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = model.forward_features(images, c)
        want = model.forward_features(images, c.expand(3, -1))
        torch.testing.assert_close(got["tokens"], want["tokens"])
        torch.testing.assert_close(got["pooled"], want["pooled"])
        one = model.forward_features(images[1:2], c)["pooled"]  # per image, by hand
        torch.testing.assert_close(one[0], want["pooled"][1])
        z = model.project(got["pooled"], c)
        torch.testing.assert_close(z, model.project(want["pooled"], c.expand(3, -1)))
        assert not torch.allclose(z, model.project(model.forward_features(images)["pooled"]))


def test_condition_refuses_the_other_sources_input():
    """A text-conditioned model given only descriptors (or the reverse) used to return None,
    so the caller silently got the plain, unconditioned features."""
    torch.manual_seed(0)
    text_cond = mmssl.create_model(
        "test_tiny_clip", vision={"cond_dim": 16}, condition={"source": "text", "dim": 16}
    )
    with pytest.raises(ValueError, match="conditioned on text.*cond_text"):
        text_cond.condition(torch.rand(2, 13))
    assert text_cond.condition() is None  # no input: the plain path, as documented
    assert text_cond.condition(cond_text=torch.randint(1, 512, (2, 5))).shape == (2, 16)
    desc_cond = mmssl.create_model("test_tiny_vit_cond")
    with pytest.raises(ValueError, match="augmentation descriptors.*pass aug"):
        desc_cond.condition(cond_text=torch.randint(1, 512, (2, 5)))
    assert desc_cond.condition() is None
    assert desc_cond.condition(torch.rand(2, 13)).shape == (2, 16)
    plain = mmssl.create_model("test_tiny_vit")  # unconditioned: any input gives None
    assert plain.condition(torch.rand(2, 13)) is None


def test_a_projector_that_reads_no_condition_still_checks_its_shape():
    """A backbone-conditioned model whose projector is plain: model.project took a c of any
    width and ignored it, and a plain Projector given one ignored it too."""
    from mmssl.models.condition import Projector

    model = mmssl.create_model("test_tiny_vit_cond", projector={"cond": "none"})
    pooled = torch.randn(2, 32)
    c = model.condition(torch.rand(2, 13))
    torch.testing.assert_close(model.project(pooled, c), model.project(pooled))
    with pytest.raises(ValueError, match=r"projector cond must be \(B or 1, 16\) for 2 features"):
        model.project(pooled, torch.randn(2, 99))
    with pytest.raises(ValueError, match="this projector is not conditioned"):
        Projector(8, 16, 4)(torch.randn(2, 8), torch.randn(2, 99))


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


def test_projector_depth_counts_its_linear_layers():
    """depth 1 used to build the 2-layer projector silently, and hyper_rank 0 a hypernetwork
    that could never change the output."""
    for depth in (2, 3, 4):
        model = mmssl.create_model("test_tiny_simclr", projector={"depth": depth})
        linears = [m for m in model.projector.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == depth
    with pytest.raises(ValueError, match="projector depth must be >= 2"):
        mmssl.create_model("test_tiny_simclr", projector={"depth": 1})
    with pytest.raises(ValueError, match="hyper_rank must be >= 1"):
        mmssl.create_model(
            "test_tiny_simclr", condition={"dim": 8}, projector={"cond": "hyper", "hyper_rank": 0}
        )


def test_a_projector_without_a_vision_tower_is_refused_by_name():
    """It failed with an AttributeError ('NoneType' object has no attribute 'dim')."""
    with pytest.raises(ValueError, match="a projector needs a vision tower"):
        mmssl.create_model("test_tiny_gpt", projector={"hidden_dim": 8, "out_dim": 4})


def test_a_descriptor_without_a_batch_dimension_is_refused_by_name():
    """A (13,) descriptor passed check_descriptor and failed inside adaLN ("not enough values
    to unpack"); a (1, 13) one serves every image."""
    model = mmssl.create_model("test_tiny_vit_cond")
    neutral = model.conditioner.layout.neutral_tensor(1)
    with pytest.raises(ValueError, match=r"descriptors must be \(B, 13\).*aug\[None\]"):
        model.condition(neutral[0])
    images = torch.rand(3, 3, 32, 32)
    one = model.visual.forward_features(images, model.condition(neutral))["pooled"]
    each = model.visual.forward_features(images, model.condition(neutral.expand(3, -1)))["pooled"]
    torch.testing.assert_close(one, each)


def test_hypernetwork_projector_matches_materialised_weights():
    """sum_k a_k (W_k f) equals building W(c) = W0 + sum_k a_k W_k per sample."""
    from mmssl.models.condition import Projector

    torch.manual_seed(0)
    proj = Projector(6, 5, 3, cond="hyper", cond_dim=4, hyper_rank=3)
    torch.nn.init.normal_(proj.hyper_weight)
    f, c = torch.randn(2, 6), torch.randn(2, 4)
    a = torch.relu(proj.hyper_coef(c))  # (B, K)
    w_k = proj.hyper_weight.view(3, 5, 6)
    rows = []
    for i in range(2):
        w = proj.fc1.weight + sum(a[i, k] * w_k[k] for k in range(3))
        rows.append(w @ f[i] + proj.fc1.bias)
    expected = proj.rest(torch.stack(rows))
    torch.testing.assert_close(proj(f, c), expected, atol=1e-6, rtol=1e-5)


def test_wrong_descriptor_names_the_expected_layout():
    model = mmssl.create_model("test_tiny_vit_cond")
    with pytest.raises(ValueError, match=r"v1\[13\]: blur 0:1"):
        model.condition(torch.rand(2, 12))
    with pytest.raises(ConfigError, match="condition: layout 'v0' is no augmentation descriptor"):
        mmssl.create_model("test_tiny_vit_cond", condition={"layout": "v0"})
    with pytest.raises(ConfigError, match="condition"):
        mmssl.create_model("test_tiny_simclr", projector={"cond": "film"})


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


def _tiny_export(tmp_path):
    torch.manual_seed(0)
    model = small("test_tiny_clip").eval()
    return model, save_pretrained(model, tmp_path / "export")


def test_export_is_all_or_nothing_and_readable_by_others(tmp_path):
    import json
    import os
    import stat

    model, out = _tiny_export(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "config.json"):  # safetensors alone makes its file 0600
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o666 & ~mask, name
    # config.json cannot be replaced (a directory is in the way): the old weights must stay
    weights = (out / "model.safetensors").read_bytes()
    (out / "config.json").unlink()
    (out / "config.json").mkdir()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(FileExistsError, match=r"config\.json exists and is not a file"):
        save_pretrained(model, out)
    assert (out / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    # a failure between the two writes leaves both old files and no temporaries
    (out / "config.json").rmdir()
    (out / "config.json").write_text(json.dumps({"old": 1}))
    with pytest.raises(TypeError):
        save_pretrained(model, out, extra={"recipe": object()})  # not JSON: fails after weights
    assert (out / "model.safetensors").read_bytes() == weights
    assert json.loads((out / "config.json").read_text()) == {"old": 1}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(FileExistsError, match="not a directory"):
        save_pretrained(model, out / "config.json")


def test_export_interrupted_between_its_renames_is_no_export(tmp_path, monkeypatch):
    """An interruption after the new weights took their place and before the new config did
    left them beside the old config.json, which then loaded as one export."""
    import os

    from mmssl.models import io

    model, out = _tiny_export(tmp_path)
    save_pretrained(model, out, {"recipe": "old"})
    renames, real = [], os.replace

    def interrupted(src, dst):
        if renames:  # the second rename, config.json's
            raise KeyboardInterrupt
        renames.append(dst)
        real(src, dst)

    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(io.os, "replace", interrupted)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, out, {"recipe": "new"})
    monkeypatch.undo()
    assert [p.name for p in renames] == ["model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]  # no temporaries
    assert (out / "model.safetensors").read_bytes() != before  # the new weights, alone
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(out)
    save_pretrained(model, out, {"recipe": "new"})  # the next export completes it
    assert io.read_config(out)["recipe"] == "new"


def test_export_cli_out_is_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    from mmssl.train import export

    model, _ = _tiny_export(tmp_path)
    monkeypatch.setattr(export, "export_run", lambda run, out, tag: save_pretrained(model, out))
    (tmp_path / "file").write_text("keep\n")
    assert export.main([str(tmp_path), "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmssl export: error: ") and "not a directory" in err
    assert len(err.strip().splitlines()) == 1 and (tmp_path / "file").read_text() == "keep\n"


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("norm_eps", float("nan"), r"model\.vision\.block\.norm_eps must be a finite number"),
        ("norm_eps", -1.0, r"model\.vision\.block\.norm_eps must be > 0"),
        ("mlp_ratio", 0.0, r"model\.vision\.block\.mlp_ratio must be > 0"),
    ],
)
def test_loaded_config_values_are_checked(tmp_path, key, value, match):
    import json

    _, out = _tiny_export(tmp_path)
    data = json.loads((out / "config.json").read_text())
    data["model"]["vision"]["block"][key] = value
    (out / "config.json").write_text(json.dumps(data))  # json writes NaN as in the report
    with pytest.raises(ConfigError, match=r"config\.json: " + match):
        mmssl.load_encoder(str(out))


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    """A config.json of another width next to the weights (copied from another export), or
    integer tensors where the model has floats, is one ValueError naming both files, not
    torch's RuntimeError from load_state_dict, and no int silently cast into a float."""
    import json

    from safetensors.torch import load_file, save_file

    model, out = _tiny_export(tmp_path)
    good = (out / "config.json").read_text()
    data = json.loads(good)
    data["model"]["vision"]["dim"] *= 2  # same keys, every vision tensor another shape
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match .*config\.json") as e:
        mmssl.load_encoder(str(out))
    dim = model.cfg.vision.dim
    assert f"visual.cls_token: (1, 1, {dim}) vs (1, 1, {2 * dim})" in str(e.value)
    (out / "config.json").write_text(good)
    state = load_file(str(out / "model.safetensors"))
    state["logit_scale"] = torch.tensor(3)
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"dtypes .*logit_scale: torch\.int64 vs torch\.float32"):
        mmssl.load_encoder(str(out))


def test_load_encoder_on_a_run_directory_says_export_it(tmp_path):
    (tmp_path / "recipe.yaml").write_text("model: {name: test_tiny_clip}\n")
    with pytest.raises(FileNotFoundError, match=r"training run directory.*mmssl export"):
        mmssl.load_encoder(str(tmp_path))


def test_export_module_runs_as_a_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mmssl.train.export", str(tmp_path / "no_run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "mmssl export: error: " in proc.stderr


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


def test_bf16_conditioned_model_takes_bf16_and_fp32_descriptors():
    # DeepSpeed's bf16 casts the whole model: c must come out in the weights' dtype, from a
    # batch's bf16 descriptors and from the fp32 neutral descriptor alike
    torch.manual_seed(0)
    ref = mmssl.create_model("test_tiny_vit_cond").eval()
    with torch.no_grad():
        for p in ref.parameters():
            if not p.any():  # the zero-initialised conditioning, so that c matters
                p.normal_(std=0.02)
    ref.load_state_dict({k: v.bfloat16().float() for k, v in ref.state_dict().items()})
    model = mmssl.create_model("test_tiny_vit_cond").eval()
    model.load_state_dict(ref.state_dict())
    model.bfloat16()
    images, aug = torch.randn(2, 3, 32, 32), torch.rand(2, 13)
    neutral = model.conditioner.layout.neutral_tensor(2)
    with torch.no_grad():
        for a in (aug.bfloat16(), aug, neutral):
            c_ref = ref.condition(a.float())
            want = ref.project(ref.forward_features(images, c_ref)["pooled"], c_ref)
            c = model.condition(a)
            assert c.dtype == torch.bfloat16
            got = model.project(model.forward_features(images.bfloat16(), c)["pooled"], c)
            assert (got.float() - want).norm() / want.norm() < 0.05
        assert model.neutral_condition(2).dtype == torch.bfloat16


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


def test_film_projector_formula() -> None:
    """FiLM away from its zero init: rest(fc1(f) * (1 + scale(c)) + shift(c))."""
    from mmssl.models.condition import Projector

    torch.manual_seed(0)
    p = Projector(6, 5, 3, cond="film", cond_dim=4)
    torch.nn.init.normal_(p.film.weight)
    torch.nn.init.normal_(p.film.bias)
    f, c = torch.randn(2, 6), torch.randn(2, 4)
    scale, shift = p.film(c).chunk(2, -1)
    torch.testing.assert_close(p(f, c), p.rest(p.fc1(f) * (1 + scale) + shift))


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
