"""The fused LM head + cross-entropy (`mmssl.nn.linear_ce`) against the plain logits path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mmssl.nn import linear_ce
from mmssl.objectives import head_next_token_loss, head_next_token_sum, next_token_loss


def _inputs(dtype: torch.dtype = torch.float64, v: int = 37, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 9, 8, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(v, 8, generator=g, dtype=dtype).requires_grad_()
    tokens = torch.randint(0, v, (3, 9), generator=g)
    tokens[1, 4] = -100  # an ignored target inside a row
    mask = torch.arange(9)[None, :] < torch.tensor([[9], [6], [1]])  # row 2: no target at all
    return hidden, weight, tokens, mask


def _loss_and_grads(loss: Tensor, *inputs: Tensor) -> list[Tensor]:
    return [loss.detach(), *torch.autograd.grad(loss, inputs)]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("block_bytes", [8, 1 << 22])  # one row per block / one block
def test_fp64_equals_the_plain_path(monkeypatch, smoothing, use_mask, block_bytes) -> None:
    monkeypatch.setattr(linear_ce, "_BLOCK_BYTES", block_bytes)
    hidden, weight, tokens, mask = _inputs()
    m = mask if use_mask else None
    plain = next_token_loss(F.linear(hidden, weight), tokens, m, label_smoothing=smoothing)
    fused = head_next_token_loss(hidden, weight, tokens, m, label_smoothing=smoothing)
    for a, b in zip(_loss_and_grads(plain, hidden, weight), _loss_and_grads(fused, hidden, weight)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("v", [1, 63, 64, 65])
def test_vocabularies_at_and_around_the_row_padding(v) -> None:
    """The (N, V) buffer's rows are padded to a multiple of 64: the padding is never a
    logit and never reaches a gradient (64: no padding; 65: 63 columns of it)."""
    hidden, weight, tokens, mask = _inputs(v=v)
    plain = next_token_loss(F.linear(hidden, weight), tokens, mask, label_smoothing=0.1)
    fused = head_next_token_loss(hidden, weight, tokens, mask, label_smoothing=0.1)
    for a, b in zip(_loss_and_grads(plain, hidden, weight), _loss_and_grads(fused, hidden, weight)):
        assert b.shape == a.shape
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_an_ignored_row_of_inf_hidden_gets_a_zero_gradient() -> None:
    """An ignored row's gradient is 0 even for an inf hidden state (the plain path gives NaN
    there, 0 * the softmax of inf): the padding columns' 0 * inf = NaN reach no gradient."""
    _, weight, _, _ = _inputs(v=37)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 8, generator=g, dtype=torch.float64)
    hidden[2, 0] = math.inf
    hidden.requires_grad_()
    targets = torch.tensor([3, 1, -100, 7, 0])
    loss = linear_ce.linear_cross_entropy(hidden, weight, targets)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and not grad[2].any()


def test_fp32_saves_the_weight_itself_not_its_padded_copy() -> None:
    """No cast in fp32: the backward reads the weight itself, so the padded copy (another
    V x D in fp32, 154 MB at GPT-2 small's) lives for the forward only."""
    hidden, weight, tokens, _ = _inputs(torch.float32, v=37)
    loss = linear_ce.linear_cross_entropy(hidden[0], weight, tokens[0].clamp(min=0))
    saved = loss.grad_fn.saved_tensors  # type: ignore[union-attr]
    assert saved[1].data_ptr() == weight.data_ptr() and saved[1].shape == weight.shape


def test_blocks_with_a_ragged_last_block(monkeypatch) -> None:
    """27 rows in blocks of 4 (the last holds 3): the sum and gradients do not depend on
    the block size."""
    hidden, weight, tokens, mask = _inputs()
    out = []
    for block_bytes in (4 * 37 * 4, 1 << 22):
        monkeypatch.setattr(linear_ce, "_BLOCK_BYTES", block_bytes)
        loss = head_next_token_loss(hidden, weight, tokens, mask)
        out.append(_loss_and_grads(loss, hidden, weight))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_bf16_autocast_matches_the_plain_path_to_bf16_rounding() -> None:
    """Under autocast both paths make the same bf16 logits; the loss agrees to fp32 sums,
    the gradients to bf16 rounding (the plain path rounds the scaled gradient, the fused
    one the unscaled)."""
    hidden, weight, tokens, mask = _inputs(torch.float32, v=301)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = next_token_loss(F.linear(hidden, weight).float(), tokens, mask)
        fused = head_next_token_loss(hidden, weight, tokens, mask)
    a = _loss_and_grads(plain, hidden, weight)
    b = _loss_and_grads(fused, hidden, weight)
    assert b[0].dtype == torch.float32
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=0)
    for x, y in zip(a[1:], b[1:]):
        assert y.dtype == torch.float32
        assert float((x - y).abs().max()) <= 2e-2 * float(x.abs().max())


def test_bf16_weights_give_bf16_gradients() -> None:
    """bf16 weights (DeepSpeed's bf16 mode): computed in bf16, gradients in bf16."""
    hidden, weight, tokens, _ = _inputs(torch.float32, v=301)
    hb = hidden.detach().bfloat16().requires_grad_()
    wb = weight.detach().bfloat16().requires_grad_()
    fused = head_next_token_loss(hb, wb, tokens)
    ref = next_token_loss(F.linear(hb, wb).float(), tokens)
    gh, gw = torch.autograd.grad(fused, (hb, wb))
    assert gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=0)
    rh, rw = torch.autograd.grad(ref, (hb, wb))
    assert float((gw.float() - rw.float()).abs().max()) <= 2e-2 * float(rw.float().abs().max())


def test_without_grad_gives_the_same_value() -> None:
    hidden, weight, tokens, mask = _inputs()
    with torch.no_grad():
        a = head_next_token_loss(hidden, weight, tokens, mask)
    b = head_next_token_loss(hidden.detach(), weight.detach(), tokens, mask)
    c = next_token_loss(F.linear(hidden, weight), tokens, mask)
    assert not a.requires_grad and not b.requires_grad
    torch.testing.assert_close(a, c.detach())
    torch.testing.assert_close(b, c.detach())


def test_no_counted_target_gives_zero_and_zero_gradients() -> None:
    hidden, weight, tokens, _ = _inputs()
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    loss = head_next_token_loss(hidden, weight, tokens, mask)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    assert float(loss.detach()) == 0.0 and not gh.any() and not gw.any()


def test_bad_shapes_are_named() -> None:
    hidden, weight, tokens, _ = _inputs()
    with pytest.raises(ValueError, match="hidden"):
        head_next_token_loss(hidden[0], weight, tokens)
    with pytest.raises(ValueError, match="weight"):
        linear_ce.linear_cross_entropy(hidden[0], weight[:, :5], tokens[0])
    with pytest.raises(ValueError, match="targets"):
        linear_ce.linear_cross_entropy(hidden[0], weight, tokens[0, :4])


@pytest.mark.parametrize(
    "model, objective",
    [
        ("test_tiny_gpt", "next_token"),
        ("test_tiny_coca", "captioning"),  # cross-attention decoder
        ("test_tiny_coca_prefix", "captioning"),  # image prefix through the text tower
    ],
)
def test_trainer_fused_head_equals_the_plain_path(model: str, objective: str) -> None:
    """The recipe switch `objectives.NAME.fused_head`: same loss and gradients (fp32)."""
    from mmssl.models.multimodal import MultimodalModel
    from mmssl.train.recipe import recipe_from_dict, validate
    from mmssl.train.tasks import Task

    kind = "text" if objective == "next_token" else "image_text"
    g = torch.Generator().manual_seed(1)
    batch = {"text": torch.randint(1, 50, (2, 12), generator=g)}
    batch["text_mask"] = torch.ones_like(batch["text"], dtype=torch.bool)
    batch["text_mask"][1, 7:] = False
    if kind == "image_text":
        batch["image"] = torch.rand(2, 3, 32, 32, generator=g)
    grads = []
    for fused in (True, False):
        recipe = recipe_from_dict(
            {
                "model": {"name": model},
                "data": {"views": 0, "sources": {"train": {"urls": "synthetic", "kind": kind}}},
                "objectives": {objective: {"fused_head": fused}},
            }
        )
        resolved = validate(recipe, world_size=1, check_files=False)
        torch.manual_seed(0)
        task = Task(MultimodalModel(resolved.model), recipe.objectives)
        loss, _ = task({"train": batch})
        loss.backward()
        named = [(n, p.grad) for n, p in task.named_parameters() if p.grad is not None]
        assert any(n.startswith("model.text.") for n, _ in named)
        grads.append([loss.detach()] + [g.clone() for _, g in named])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("leaf_dtype", [torch.float32, torch.bfloat16])
def test_bf16_gradient_is_linear_in_the_incoming_gradient(leaf_dtype) -> None:
    """d(s * sum) = s * d(sum), up to one rounding to the leaves' dtype: a token mean's
    1/count must not be rounded to bf16 before it scales the gradient (1/3 -> 0.33398 made
    every element 0.2% too large)."""
    hidden, weight, tokens, mask = _inputs(torch.float32, v=301)
    hidden = hidden.detach().to(leaf_dtype).requires_grad_()
    weight = weight.detach().to(leaf_dtype).requires_grad_()
    for s in (1 / 3, 2 / 7, 1e-3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total, _ = head_next_token_sum(hidden, weight, tokens, mask)
            scaled = head_next_token_sum(hidden, weight, tokens, mask)[0] * s
        base = torch.autograd.grad(total, (hidden, weight))
        got = torch.autograd.grad(scaled, (hidden, weight))
        for b, g in zip(base, got):
            assert g.dtype == leaf_dtype
            torch.testing.assert_close(g, (b.double() * s).to(leaf_dtype), rtol=1e-6, atol=0)
