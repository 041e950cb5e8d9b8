"""Conditioned models and projectors: zero-init equivalence with the plain model, one
condition serving a batch, the condition's sources and shapes refused by name, the FiLM and
hypernetwork projectors' formulas, projector depth, and bf16 conditioning."""

from __future__ import annotations

import pytest
import torch

import mmssl
from mmssl.schema import ConfigError


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
