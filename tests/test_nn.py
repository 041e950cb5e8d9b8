"""Building blocks against naive references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmssl.models import create_model
from mmssl.nn import (
    Attention,
    Block,
    ContextKVCache,
    DropPath,
    LayerKVCache,
    Norm,
    PatchEmbed,
    RotaryEmbedding,
    SwiGLU,
    Transformer,
    apply_rotary,
    sincos_2d,
)
from mmssl.schema import ConfigError


def naive_attention(q, k, v, allowed):
    """Softmax attention written out: (B, H, N, d) each; allowed (N, M) or (B, 1, N, M) bool."""
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhnm,bhmd->bhnd", scores.softmax(-1), v)


def split_heads(t, h):
    b, n, d = t.shape
    return t.view(b, n, h, d // h).transpose(1, 2)


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_attention_matches_naive_softmax(causal, with_mask, kernel):
    torch.manual_seed(0)
    b, n, d, h = 2, 7, 24, 3
    attn = Attention(d, h, qk_norm=False).eval()
    attn.kernel = kernel
    x = torch.randn(b, n, d)
    allowed = torch.ones(b, 1, n, n, dtype=torch.bool)
    mask = None
    if with_mask:
        keep = torch.rand(b, n) > 0.3
        keep[:, 0] = True
        mask = keep[:, None, None, :]
        allowed = allowed & mask
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    q, k, v = (split_heads(t, h) for t in attn.qkv(x).chunk(3, -1))
    ref = attn.proj(naive_attention(q, k, v, allowed).transpose(1, 2).reshape(b, n, d))
    out = attn(x, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch", [2, 3])  # 3 == num_heads: the old broadcast ran silently
def test_attention_refuses_a_3d_mask_and_takes_one_mask_per_sample(kernel, causal, batch):
    """(B, N, N) broadcast against (B, H, N, N) as (1, B, N, N): sample i's mask went to head
    i (wrong without an error when B == H).  It is refused; (B, 1, N, N) is per sample."""
    torch.manual_seed(0)
    n, d, h = 5, 24, 3
    attn = Attention(d, h).eval()
    attn.kernel = kernel
    x = torch.randn(batch, n, d)
    mask = torch.rand(batch, n, n) > 0.4
    mask[..., 0] = True
    with pytest.raises(ValueError, match=r"3-D attn_mask .* \(B, 1, Nq, Nk\)"):
        attn(x, attn_mask=mask, is_causal=causal)
    allowed = mask[:, None]
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    q, k, v = (split_heads(t, h) for t in attn.qkv(x).chunk(3, -1))
    ref = attn.proj(naive_attention(q, k, v, allowed).transpose(1, 2).reshape(batch, n, d))
    out = attn(x, attn_mask=mask[:, None], is_causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_cross_attention_matches_naive(kernel):
    torch.manual_seed(0)
    attn = Attention(16, 2, cross=True, context_dim=12).eval()
    attn.kernel = kernel
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 9, 12)
    q = split_heads(attn.q(x), 2)
    k, v = (split_heads(t, 2) for t in attn.kv(ctx).chunk(2, -1))
    ref = naive_attention(q, k, v, torch.ones(5, 9, dtype=torch.bool))
    ref = attn.proj(ref.transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x, context=ctx), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="context"):
        attn(x)


def test_cross_attention_context_cache_projects_once():
    torch.manual_seed(0)
    attn = Attention(16, 2, qk_norm=True, cross=True, context_dim=12).eval()
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 9, 12)
    cache = ContextKVCache()
    torch.testing.assert_close(attn(x, context=ctx, context_cache=cache), attn(x, context=ctx))
    # later calls reuse the keys and values: the contract is one context per cache
    assert torch.equal(attn(x, context=ctx + 1, context_cache=cache), attn(x, context=ctx))
    cache.reorder(torch.tensor([1, 1, 0]))
    rows = [1, 1, 0]
    out = attn(x[rows], context=ctx[rows], context_cache=cache)
    torch.testing.assert_close(out, attn(x[rows], context=ctx[rows]))
    with pytest.raises(ValueError, match="one cache per context"):
        attn(x, context=ctx, context_cache=cache)
    with pytest.raises(ValueError, match="kv cache is for self-attention"):
        attn(x, context=ctx, kv_cache=LayerKVCache(8))
    with pytest.raises(ValueError, match=r"a context \(or its cache\) is for cross-attention"):
        Attention(16, 2)(x, context_cache=ContextKVCache())


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i, j):
        qi = apply_rotary(q, rope(torch.tensor([i])))
        kj = apply_rotary(k, rope(torch.tensor([j])))
        return (qi * kj).sum()

    torch.testing.assert_close(score(3, 1), score(10, 8))
    torch.testing.assert_close(score(0, 0), (q * k).sum())  # position 0 is the identity
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_rotary_2d_relative_in_both_axes():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, axes=2)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pi, pj):
        qi = apply_rotary(q, rope(torch.tensor([pi])))
        kj = apply_rotary(k, rope(torch.tensor([pj])))
        return (qi * kj).sum()

    torch.testing.assert_close(score((2, 3), (1, 1)), score((5, 7), (4, 5)))


def test_rotary_angles_stay_exact_in_a_bf16_model():
    """model.bfloat16() (DeepSpeed's bf16) must not round the frequencies: far positions
    would turn by other angles in training than in the fp32 export."""
    head_dim, n = 64, 1024
    rope = RotaryEmbedding(head_dim).bfloat16()
    cos, sin = rope(torch.arange(n))
    freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * freq  # (N, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    torch.testing.assert_close(cos.double(), angles.cos(), atol=1e-3, rtol=0)
    torch.testing.assert_close(sin.double(), angles.sin(), atol=1e-3, rtol=0)


def test_sincos_2d_values():
    emb = sincos_2d(8, 2, 3)  # (6, 8): [sin(y w), cos(y w), sin(x w), cos(x w)], w = 1, 1e-2
    assert emb.shape == (6, 8)
    row, col = 1, 2
    e = emb[row * 3 + col]
    expected = [
        math.sin(row),
        math.sin(row / 100),
        math.cos(row),
        math.cos(row / 100),
        math.sin(col),
        math.sin(col / 100),
        math.cos(col),
        math.cos(col / 100),
    ]
    torch.testing.assert_close(e, torch.tensor(expected), atol=1e-6, rtol=0)


def test_norms_match_torch():
    x = torch.randn(3, 5, 16)
    ln = Norm(16, "layernorm", 1e-6)
    torch.testing.assert_close(ln(x, torch.randn(3, 4)), F.layer_norm(x, (16,), eps=1e-6))
    rms = Norm(16, "rmsnorm", 1e-6)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(rms(x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="norm"):
        Norm(16, "batchnorm")


def test_swiglu_matches_formula():
    m = SwiGLU(8, 12)
    x = torch.randn(4, 8)
    w1, w2 = m.fc1.weight[:12], m.fc1.weight[12:]
    ref = (F.silu(x @ w1.T) * (x @ w2.T)) @ m.fc2.weight.T
    torch.testing.assert_close(m(x), ref)


def test_patch_embed_is_patch_flatten_and_linear():
    pe = PatchEmbed(4, 3, 10)
    img = torch.randn(2, 3, 8, 12)
    patches = img.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, C, 2, 3, 4, 4)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 6, 48)
    ref = patches @ pe.proj.weight.reshape(10, 48).T + pe.proj.bias
    torch.testing.assert_close(pe(img), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        pe(torch.randn(1, 3, 9, 8))


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (torch.rand(3, 8, 8), ValueError, r"\(B, C, H, W\), got shape \(3, 8, 8\)"),
        (torch.rand(2, 1, 8, 8), ValueError, "1 channels .* takes 3"),
        (torch.rand(2, 8, 8, 3), ValueError, "8 channels .* takes 3"),  # HWC
        (torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8), TypeError, "uint8"),
        # bf16 images into fp32 weights outside autocast: a matmul dtype error before
        (torch.rand(2, 3, 8, 8).bfloat16(), TypeError, "bfloat16 but .*float32: .*autocast"),
    ],
)
def test_patch_embed_names_the_wrong_input(images, error, match):
    with pytest.raises(error, match=match):
        PatchEmbed(4, 3, 10)(images)


def test_patch_embed_takes_other_dtypes_under_autocast_and_matching_weights():
    pe, img = PatchEmbed(4, 3, 10), torch.rand(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pe(img.bfloat16()).dtype == torch.bfloat16
    assert pe.bfloat16()(img.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("channels_last", [False, True])
def test_patch_embed_matches_the_strided_conv_and_its_gradients(channels_last):
    torch.manual_seed(0)
    pe = PatchEmbed(4, 3, 10)
    img = torch.randn(2, 3, 8, 12)
    if channels_last:
        img = img.contiguous(memory_format=torch.channels_last)
    out = pe(img)
    ref = F.conv2d(img, pe.proj.weight, pe.proj.bias, stride=4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [pe.proj.weight, pe.proj.bias], g)
    want = torch.autograd.grad(ref, [pe.proj.weight, pe.proj.bias], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_drop_path_identity_in_eval_and_unbiased_in_train():
    dp = DropPath(0.3)
    x = torch.ones(20000, 4)
    assert torch.equal(dp.eval()(x), x)
    out = dp.train()(x)
    kept = (out[:, 0] != 0).float().mean()
    assert abs(kept.item() - 0.7) < 0.02
    assert abs(out.mean().item() - 1.0) < 0.03


def test_drop_path_one_drops_everything_and_the_rate_is_checked():
    # p=1 computed x * 0 / 0 = NaN; timm gives zeros.  -0.5 was silently no drop path and
    # 1.5 failed at the first forward with bernoulli's "p=-0.5"
    x = torch.ones(8, 4)
    assert torch.equal(DropPath(1.0).train()(x), torch.zeros_like(x))
    for p in (-0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="drop_path must be in"):
            DropPath(p)
        with pytest.raises(ValueError, match="drop_path must be in"):
            Transformer(8, 2, 2, drop_path=p)
    with pytest.raises(ConfigError, match="block.drop_path must be in"):
        create_model("test_tiny_vit", **{"vision.block.drop_path": 1.5})


def test_zero_init_conditioned_block_equals_plain_block():
    torch.manual_seed(0)
    plain = Block(32, 4)
    cond = Block(32, 4, cond_dim=13)
    missing, unexpected = cond.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("modulation" in k or "gate" in k for k in missing)
    # the constructor zeroes the conditioning weights: no init_weights call needed
    x, c = torch.randn(2, 5, 32), torch.randn(2, 13)
    torch.testing.assert_close(cond(x, c), plain(x), atol=0, rtol=0)
    torch.testing.assert_close(cond(x, None), plain(x), atol=0, rtol=0)
    # Once the modulation is non-zero the condition changes the output.
    torch.nn.init.normal_(cond.norm1.modulation.weight)
    assert not torch.allclose(cond(x, c), plain(x))


def test_zero_init_conditioning_still_gets_gradients():
    torch.manual_seed(0)
    block = Block(16, 2, cond_dim=4)
    block(torch.randn(2, 3, 16), torch.randn(2, 4)).pow(2).sum().backward()
    assert block.norm1.modulation.weight.grad.abs().sum() > 0
    assert block.gate2.gate.weight.grad.abs().sum() > 0


def test_transformer_conditions_only_top_blocks():
    t = Transformer(16, 4, 2, cond_dim=5, cond_depth=2)
    conditioned = [hasattr(b.norm1, "modulation") for b in t.blocks]
    assert conditioned == [False, False, True, True]


def test_gradient_checkpointing_equal_outputs_and_grads():
    torch.manual_seed(0)
    a = Transformer(16, 3, 2, causal=True)
    b = Transformer(16, 3, 2, causal=True, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, 16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    torch.testing.assert_close(ya, yb)
    ya.pow(2).sum().backward()
    yb.pow(2).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_patch_projection_is_the_conv_for_other_settings_and_sizes():
    from mmssl.nn.layers import PatchProjection

    torch.manual_seed(0)
    proj = PatchProjection(3, 10, 4)
    img = torch.randn(2, 3, 10, 13)  # 4 divides neither side: the conv rounds down
    ref = F.conv2d(img, proj.weight, proj.bias, stride=4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(proj(img), ref)
    proj.stride, proj.padding = (2, 2), (1, 1)  # overlapping, padded patches
    ref = F.conv2d(img, proj.weight, proj.bias, stride=2, padding=1).flatten(2).transpose(1, 2)
    torch.testing.assert_close(proj(img), ref)


def test_drop_path_rates_rise_linearly_from_zero() -> None:
    """Stochastic depth as timm: block i of d drops with rate drop_path * i / (d - 1)."""
    from mmssl.nn.block import Transformer

    t = Transformer(8, 3, 2, drop_path=0.2)
    rates = [0.0 if isinstance(b.drop_path, torch.nn.Identity) else b.drop_path.p for b in t.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])


def test_sincos_2d_off_diagonal_cell() -> None:
    """Row 0, column 1 of a 2 x 3 grid: the first half encodes the row (0), the second the
    column (1): a transposed grid gives the same last cell but not this one."""
    from mmssl.nn.pos_embed import sincos_2d

    e = sincos_2d(8, 2, 3)[1]
    torch.testing.assert_close(e[:4], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(e[4], torch.tensor(math.sin(1.0)))


def test_rotary_turns_each_pair_by_its_angle() -> None:
    """apply_rotary against complex multiplication: the pair (x[i], x[i + d/2]) as
    x[i] + 1j x[i + d/2] times exp(1j * pos * base^(-2i/d)) (the GPT-NeoX / LLaMA convention;
    the opposite turn also gives relative scores, so the tests above cannot tell)."""
    torch.manual_seed(0)
    d, n = 8, 5
    x = torch.randn(1, 1, n, d, dtype=torch.float64)
    got = apply_rotary(x, RotaryEmbedding(d)(torch.arange(n)))
    freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    turn = torch.polar(torch.ones(n, d // 2, dtype=torch.float64), torch.arange(n)[:, None] * freq)
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * turn
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], dim=-1), rtol=1e-6, atol=1e-6)


def test_norm_default_eps_is_1e_6() -> None:
    """Norm's default eps is 1e-6 (as timm's ViTs; torch's default is 1e-5): on rows whose
    variance is near eps the two give other outputs."""
    torch.manual_seed(0)
    x = 1e-3 * torch.randn(4, 8)  # variance ~1e-6
    ours, ref = Norm(8), torch.nn.LayerNorm(8, eps=1e-6)
    with torch.no_grad():
        for p, q in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
            p.copy_(torch.randn(8))
            q.copy_(p)
        torch.testing.assert_close(ours(x), ref(x))
        other = F.layer_norm(x, (8,), ours.weight, ours.bias, 1e-5)
        assert (ours(x) - other).abs().max() > 0.1  # the test can fail
