"""Attention with qk-norm and rotary positions together, against softmax attention written out.

Guards the order of the two: each head's query and key are normalised first (LayerNorm with
its own weight and bias) and rotated after, so the dot products of the rotated vectors depend
on relative position only.  Rotating first and normalising after also runs, and with unit
norm weights and zero biases it can look almost right; with non-trivial weights and biases
it does not.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmssl.nn import Attention, RotaryEmbedding


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """LayerNorm over the last dim, written out."""
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary positions (GPT-NeoX / LLaMA convention): the pair (x[i], x[i + d/2]) as the
    complex number x[i] + 1j x[i + d/2], times exp(1j * pos * base^(-2i/d))."""
    d = x.shape[-1]
    freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions.double()[:, None] * freq  # (N, d/2)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double())
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
@pytest.mark.parametrize("causal", [False, True])
@torch.no_grad()
def test_qk_norm_comes_before_the_rotation(kernel, causal):
    """q = rotate(norm_q(q)), k = rotate(norm_k(k)), softmax(q k^T / sqrt(d)) v, projection."""
    torch.manual_seed(0)
    b, n, dim, h = 2, 6, 32, 2
    d = dim // h
    attn = Attention(dim, h, qk_norm=True).eval()
    attn.kernel = kernel
    for norm in (attn.q_norm, attn.k_norm):  # weights and biases far from 1 and 0
        norm.weight.copy_(torch.randn(d) * 0.8 + 1.0)
        norm.bias.copy_(torch.randn(d) * 0.8)
    x = torch.randn(b, n, dim)
    positions = torch.arange(3, 3 + n)  # not from 0: every row is turned
    out = attn(x, is_causal=causal, rope=RotaryEmbedding(d)(positions))

    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    q, k, v = (t.view(b, n, h, d).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
    q = rotate(layer_norm(q, attn.q_norm), positions)
    k = rotate(layer_norm(k, attn.k_norm), positions)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)
    if causal:
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, dim)
    ref = attn.proj(ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
