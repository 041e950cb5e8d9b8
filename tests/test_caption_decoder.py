"""The CoCa-style caption decoder against a hand-written decoder, and its captioning targets.

The reference spells out CoCa's multimodal decoder layer (causal self-attention, cross-
attention to every image token with no mask, MLP, pre-norm residuals), with rotary positions
written from their formula, on the model's own weights.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mmssl
from mmssl.objectives import CaptioningLoss, captioning_loss
from mmssl.objectives.lm import head_next_token_sum


def _layer_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _rotate(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE of x (B, H, T, d) at positions 0..T-1, rotating pairs (i, i + d/2)."""
    t, d = x.shape[-2:]
    freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    angle = torch.arange(t, dtype=torch.float64)[:, None] * freq[None]  # (T, d/2)
    cos, sin = angle.cos().float(), angle.sin().float()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _attend(q, k, v, heads: int, causal: bool, rope: bool) -> torch.Tensor:
    b, tq, d = q.shape
    q, k, v = (z.reshape(b, z.shape[1], heads, d // heads).transpose(1, 2) for z in (q, k, v))
    if rope:
        q, k = _rotate(q), _rotate(k)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d // heads)  # (B, H, Tq, Tk)
    if causal:
        allowed = torch.tensor([[j <= i for j in range(k.shape[2])] for i in range(tq)])
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, tq, d)


def naive_caption_logits(model, image_tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """CoCa's multimodal decoder over the unimodal text tower's hidden states, then the
    tied LM head: (B, N, Dv), (B, T) -> (B, T, V)."""
    rope = model.cfg.text.pos_embed == "rope"
    heads = model.cfg.text.num_heads
    x = model.text.forward_tokens(text)  # (B, T, D), the unimodal decoder
    for block in model.caption.decoder.blocks:
        h = _layer_norm(x, block.norm1)
        q, k, v = F.linear(h, block.attn.qkv.weight, block.attn.qkv.bias).chunk(3, dim=-1)
        a = _attend(q, k, v, heads, causal=True, rope=rope)
        x = x + F.linear(a, block.attn.proj.weight, block.attn.proj.bias)
        cross = block.cross
        h = _layer_norm(x, cross.norm)
        q = F.linear(h, cross.attn.q.weight, cross.attn.q.bias)
        k, v = F.linear(image_tokens, cross.attn.kv.weight, cross.attn.kv.bias).chunk(2, -1)
        a = _attend(q, k, v, heads, causal=False, rope=False)
        x = x + F.linear(a, cross.attn.proj.weight, cross.attn.proj.bias)
        h = F.gelu(block.mlp.fc1(_layer_norm(x, block.norm2)))
        x = x + block.mlp.fc2(h)
    return _layer_norm(x, model.caption.norm) @ model.text.token_embed.weight.T


@pytest.mark.parametrize("pos_embed", ["learned", "rope"])
def test_cross_decoder_matches_naive_coca_decoder(pos_embed):
    """Causal self-attention, cross-attention to all patch tokens, and (rotary text towers)
    the text positions in every decoder block, as the unimodal blocks below it have them."""
    torch.manual_seed(0)
    model = mmssl.create_model("test_tiny_coca", text={"pos_embed": pos_embed}).eval()
    with torch.no_grad():  # random norms and biases, so none of them is a no-op
        for p in model.caption.parameters():
            p.add_(0.1 * torch.randn_like(p))
    feats = model.forward_features(torch.randn(2, 3, 32, 32))
    assert feats["tokens"].shape[1] == model.visual.num_patches  # every patch, no class token
    text = torch.randint(0, 512, (2, 9))
    got = model.caption_logits(feats["tokens"], text)
    ref = naive_caption_logits(model, feats["tokens"], text)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["test_tiny_coca", "test_tiny_coca_prefix"])
def test_caption_logits_ignore_padding(name):
    """A padded row's valid logits equal those of the row run alone, unpadded, and do not
    depend on the pad id."""
    torch.manual_seed(0)
    model = mmssl.create_model(name).eval()
    tokens = model.forward_features(torch.randn(2, 3, 32, 32))["tokens"]
    mask = torch.tensor([[True] * 5 + [False] * 4, [True] * 9])
    text = torch.randint(3, 512, (2, 9)).masked_fill(~mask, 0)
    logits = model.caption_logits(tokens, text, mask)
    other_pad = model.caption_logits(tokens, text.masked_fill(~mask, 7), mask)
    alone = model.caption_logits(tokens[:1], text[:1, :5])
    torch.testing.assert_close(logits[mask], other_pad[mask], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits[0, :5], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["test_tiny_coca", "test_tiny_coca_prefix"])
def test_caption_logits_of_images_say_what_they_take(name):
    """Images (the README's neighbours take them) failed in attention: "too many values to
    unpack (expected 3)"."""
    model = mmssl.create_model(name).eval()
    with pytest.raises(ValueError, match=r"image_tokens must be \(B, N, D\), got shape \(2, 3"):
        model.caption_logits(torch.rand(2, 3, 32, 32), torch.randint(3, 512, (2, 5)))


def test_caption_decoder_checkpoints_with_the_text_tower():
    """`train.activation_checkpointing` sets the towers' grad_checkpointing; the decoder
    blocks continue the text tower and recompute in backward too, with the same grads."""
    torch.manual_seed(0)
    plain = mmssl.create_model("test_tiny_coca").train()
    ckpt = mmssl.create_model("test_tiny_coca", text={"grad_checkpointing": True}).train()
    ckpt.load_state_dict(plain.state_dict())
    images, text = torch.randn(2, 3, 32, 32), torch.randint(0, 512, (2, 8))
    calls = []
    for block in ckpt.caption.decoder.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    grads = []
    for model in (plain, ckpt):
        logits = model.caption_logits(model.forward_features(images)["tokens"], text)
        logits.pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.caption.named_parameters()})
    # forward, then the recomputation in backward
    assert len(calls) == 2 * len(ckpt.caption.decoder.blocks)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_captioning_targets_skip_bos_keep_eos(smoothing):
    """Captions framed [bos, words, eos, pad...] score the words and eos, never bos or pad;
    label smoothing is (1 - e) * nll + e * mean over the vocabulary of -log p."""
    torch.manual_seed(0)
    v, bos, eos, pad = 11, 1, 2, 0
    text = torch.tensor([[bos, 5, 6, 7, eos, pad, pad], [bos, 8, eos, pad, pad, pad, pad]])
    mask = text != pad
    hidden, weight = torch.randn(2, 7, 6), torch.randn(v, 6)
    logits = hidden @ weight.T
    terms = []
    for b in range(2):
        words = text[b][mask[b]]
        for t in range(len(words) - 1):  # position t predicts words[t + 1]
            logp = logits[b, t].log_softmax(-1)
            target = int(words[t + 1])
            assert target != bos
            terms.append((1 - smoothing) * -logp[target] - smoothing * logp.mean())
    ref = torch.stack(terms).mean()
    assert len(terms) == 4 + 2  # 3 words + eos, 1 word + eos
    torch.testing.assert_close(captioning_loss(logits, text, mask, label_smoothing=smoothing), ref)
    torch.testing.assert_close(CaptioningLoss(label_smoothing=smoothing)(logits, text, mask), ref)
    total, count = head_next_token_sum(hidden, weight, text, mask, label_smoothing=smoothing)
    torch.testing.assert_close(total / count, ref)
