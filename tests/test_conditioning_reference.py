"""Conditioning paths against references written out by hand, with every conditioning weight
moved off its zero init (at init most of these paths compute nothing and pass any check).

Gradients are compared too: a condition detached on one path (the adaLN gate, the CASSLE
projector, the text prompt) leaves the forward unchanged, and only a gradient shows it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mmssl
from mmssl.descriptor import DESCRIPTOR_V1, render_descriptor
from mmssl.models.condition import DescriptorEncoder
from mmssl.nn.block import Block
from mmssl.objectives import nt_xent_loss
from mmssl.train.recipe import ObjectiveConfig
from mmssl.train.tasks import Task

PROMPT = "a photo of a digit"


@torch.no_grad()
def _perturb(module: torch.nn.Module, scale: float = 0.3) -> None:
    for p in module.parameters():
        p.add_(scale * torch.randn_like(p))


def _grad(out: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    """d out.sum() / d wrt; zeros where `wrt` is not reached at all."""
    (g,) = torch.autograd.grad(out.sum(), wrt, allow_unused=True, materialize_grads=True)
    return g


def test_adaln_block_gradient_to_c_is_the_dit_formulas():
    """d block(x, c) / d c equals that of DiT's block written out: c reaches the output
    through the norms' shift and scale and through the gates (a detached gate input lost the
    gates' share and still computed the same forward)."""
    torch.manual_seed(0)
    dim, cond_dim = 16, 8
    blk = Block(dim, 2, cond_dim=cond_dim).eval()
    _perturb(blk, 0.2)
    x = torch.randn(3, 5, dim)
    c = torch.randn(3, cond_dim, requires_grad=True)

    def affine(lin: torch.nn.Linear) -> torch.Tensor:
        return F.silu(c) @ lin.weight.T + lin.bias

    def branch(x, norm, gate, fn):
        shift, scale = affine(norm.modulation).chunk(2, dim=-1)
        h = F.layer_norm(x, (dim,), norm.weight, norm.bias, 1e-6)
        return (1 + affine(gate.gate)[:, None]) * fn(h * (1 + scale[:, None]) + shift[:, None])

    ref = x + branch(x, blk.norm1, blk.gate1, blk.attn)
    ref = ref + branch(ref, blk.norm2, blk.gate2, blk.mlp)
    out = blk(x, c)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_grad(out, c), _grad(ref, c), atol=1e-5, rtol=1e-4)


def test_cassle_projector_trains_the_conditioner_through_w_f_c():
    """CASSLE's projector MLP([f; gamma(omega)]) back-propagates into gamma: the conditioner's
    gradient equals that of the first layer written as [f; c] @ W.T (a detached c left the
    conditioner untrained, as the projector is the only place c enters)."""
    torch.manual_seed(0)
    model = mmssl.create_model(
        "test_tiny_simclr", condition={"dim": 16}, projector={"cond": "concat"}
    ).eval()
    _perturb(model)
    proj, w_gamma = model.projector, model.conditioner.net[0].weight
    images, aug = torch.randn(4, 3, 32, 32), torch.rand(4, 13)
    f = model.forward_pooled(images).detach()
    c = model.condition(aug)
    w = torch.cat([proj.fc1.weight, proj.cond_in.weight], dim=1)
    ref = proj.rest(torch.cat([f, c], dim=1) @ w.T + proj.fc1.bias)
    out = model.project(f, model.condition(aug))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    want = _grad(ref, w_gamma)
    assert want.abs().sum() > 0
    torch.testing.assert_close(_grad(out, w_gamma), want, atol=1e-6, rtol=1e-5)


def test_descriptor_encoder_is_a_relu_mlp():
    """gamma(omega) = W2 ReLU(W1 omega + b1) + b2, from the encoder's own weights."""
    torch.manual_seed(0)
    enc = DescriptorEncoder(cond_dim=8, hidden_dim=32)
    aug = 2 * torch.rand(6, 13) - 1
    lin1, lin2 = enc.net[0], enc.net[-1]
    with torch.no_grad():
        hidden = aug @ lin1.weight.T + lin1.bias
        assert (hidden < 0).any()  # the ReLU has something to cut
        ref = hidden.clamp(min=0) @ lin2.weight.T + lin2.bias
        torch.testing.assert_close(enc(aug), ref, atol=1e-6, rtol=1e-5)


def test_prefix_tokens_follow_the_class_token():
    """The sequence is [cls + pos0, condition tokens, patches + pos]: pooling at the class
    token reads row 0 of that sequence (with the prefix placed first it read a condition
    token), and the patch tokens are the rows after the prefix."""
    torch.manual_seed(0)
    model = mmssl.create_model("test_tiny_vit_cond").eval()  # cond_tokens 2, pool "token"
    _perturb(model)
    vis = model.visual
    assert vis.cfg.cond_tokens == 2 and vis.cfg.pool == "token"
    images, c = torch.rand(3, 3, 32, 32), torch.randn(3, 16)
    with torch.no_grad():
        patches = vis.patch_embed(images)  # (B, N, D)
        pos = vis.pos_embed  # (1, 1 + N, D): the class token's row first
        cls = vis.cls_token.expand(3, -1, -1) + pos[:, :1]
        prefix = (c @ vis.cond_prefix.proj.weight.T + vis.cond_prefix.proj.bias).view(3, 2, -1)
        seq = torch.cat([cls, prefix, patches + pos[:, 1:]], dim=1)
        ref = vis.norm(vis.trunk(vis.norm_pre(seq), c))
        feats = vis.forward_features(images, c)
        torch.testing.assert_close(feats["pooled"], ref[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(feats["tokens"], ref[:, 3:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vis.forward_pooled(images, c), ref[:, 0], atol=1e-5, rtol=1e-5)


def test_a_clip_sources_plain_images_are_conditioned_on_the_neutral_descriptor():
    """A CLIP source's images have no descriptor: the Task conditions them on the neutral one
    (the full-image crop), as `encode_image(images)` does at evaluation, not on zeros."""
    from mmssl.tokenizer import get_tokenizer

    torch.manual_seed(0)
    model = mmssl.create_model(
        "test_tiny_clip",
        text={"vocab_size": get_tokenizer().vocab_size},
        vision={"cond_dim": 16},
        condition={"dim": 16},
    ).eval()
    _perturb(model, 0.5)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=g)
    batch = {"image": images, "text": torch.randint(3, 500, (4, 8), generator=g)}
    task = Task(model, {"clip": ObjectiveConfig(type="clip", source="digits")})
    neutral = torch.tensor([[0.0] * 8 + [0.5, 0.5, 1.0, 1.0] + [0.0]])  # DESCRIPTOR_V1's
    with torch.no_grad():
        got = task._vision({"digits": batch}, {})["digits"]["emb"][0]
        want = model.encode_image(images, model.condition(neutral.expand(4, -1)))
        torch.testing.assert_close(model.encode_image(images), want, atol=1e-4, rtol=1e-4)
        zeros = model.encode_image(images, model.condition(torch.zeros(4, 13)))
        assert (want - zeros).abs().max() > 1e-2  # the test can fail
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_render_descriptor_names_each_slot():
    """Each slot of a v1 descriptor, set alone, is rendered under its own name."""
    neutral = list(DESCRIPTOR_V1.neutral)
    assert render_descriptor(neutral) == "original image"

    def only(index: int, value: float) -> str:
        v = list(neutral)
        v[index] = value
        return render_descriptor(v)

    assert only(0, 1.5) == "blur 1.5"
    for index, name in enumerate(("brightness", "contrast", "saturation", "hue"), start=1):
        assert only(index, 0.25) == f"{name} +0.25"
        assert only(index, -0.1) == f"{name} -0.10"
    assert only(12, 1.0) == "grayscale"
    assert only(10, 0.5) == "crop 0.50 at (0.50, 0.50)"


def test_the_prompt_trains_the_text_tower_through_c():
    """A text-conditioned SimCLR source reaches the text tower only through its prompt:
    the prompt's token embeddings get the gradient of the loss written out with c of the
    prompt encoded alone (a detached prompt gave the text tower none)."""
    from mmssl.tokenizer import get_tokenizer

    tok = get_tokenizer()
    torch.manual_seed(0)
    model = mmssl.create_model(
        "test_tiny_clip",
        text={"vocab_size": tok.vocab_size},
        vision={"cond_dim": 16},
        condition={"source": "text", "dim": 16},
    ).eval()
    _perturb(model, 0.5)
    g = torch.Generator().manual_seed(0)
    views = [torch.rand(4, 3, 32, 32, generator=g) for _ in range(2)]
    batch = {"digits": {"views": views, "aug": [torch.rand(4, 13, generator=g) for _ in views]}}
    task = Task(model, {"simclr": ObjectiveConfig(source="digits", condition_prompt=PROMPT)})
    embed = model.text.token_embed.weight
    got = _grad(task(batch)[0], embed)

    ids, mask = tok.batch_encode([PROMPT], len(tok.encode(PROMPT)) + 2)
    c = model.condition(cond_text=ids, cond_text_mask=mask)
    z = [model.encode_image(v, c.expand(4, -1)) for v in views]
    want = _grad(nt_xent_loss(z[0], z[1], 0.1), embed)
    assert want[ids[0]].abs().sum(dim=1).min() > 0  # every prompt token's row is trained
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-3)
