"""The matmul attention kernel against SDPA (fp64), the "auto" choice, and the switches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmssl.models import VisionConfig, VisionEncoder
from mmssl.nn.attention import (
    MATMUL_MAX_SCORES,
    Attention,
    _use_matmul,
    matmul_attention,
    set_attention_kernel,
)


def _qkv(b=2, h=3, nq=6, nk=6, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda n: torch.randn(b, h, n, d, generator=g, dtype=dtype, requires_grad=True)  # noqa: E731
    return make(nq), make(nk), make(nk)


def _mask(shape, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.4


def _forward_backward(fn, q, k, v):
    out = fn(q, k, v)
    g = torch.Generator().manual_seed(2)
    out.backward(torch.randn(out.shape, generator=g, dtype=out.dtype))
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return out.detach(), grads


@pytest.mark.parametrize(
    "nq, nk, mask_shape, causal",
    [
        (6, 6, None, False),
        (6, 6, None, True),
        (4, 9, None, True),  # top-left causal triangle, as SDPA
        (9, 4, None, True),  # queries past the keys: later rows see every key
        (6, 9, (2, 1, 1, 9), False),  # key padding
        (6, 6, (2, 1, 6, 6), False),  # per-query masks
        (6, 6, (6, 6), False),
    ],
)
def test_matmul_kernel_equals_sdpa_with_gradients(nq, nk, mask_shape, causal):
    q, k, v = _qkv(nq=nq, nk=nk)
    mask = None if mask_shape is None else _mask(mask_shape)
    if mask is not None:  # every query keeps one key here; empty rows: the next test
        mask[..., 0] = True
    ref = _forward_backward(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal),
        q,
        k,
        v,
    )
    out = _forward_backward(lambda q, k, v: matmul_attention(q, k, v, mask, causal), q, k, v)
    torch.testing.assert_close(out[0], ref[0], atol=1e-12, rtol=1e-12)
    for a, b in zip(out[1], ref[1]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_query_with_no_key_gets_zeros_and_finite_gradients_as_sdpa():
    q, k, v = _qkv(nq=5, nk=7)
    mask = _mask((2, 1, 5, 7))
    mask[..., 0] = True
    mask[0, 0, 2] = False  # query 2 of sample 0 may attend to nothing
    mask[1, 0, 4] = False
    ref = _forward_backward(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), q, k, v
    )
    out = _forward_backward(lambda q, k, v: matmul_attention(q, k, v, mask), q, k, v)
    assert torch.equal(out[0][0, :, 2], torch.zeros_like(out[0][0, :, 2]))
    torch.testing.assert_close(out[0], ref[0], atol=1e-12, rtol=1e-12)
    for a, b in zip(out[1], ref[1]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_bf16_matmul_kernel_close_to_fp64():
    q, k, v = _qkv(b=4, h=4, nq=50, nk=50, d=64, dtype=torch.float32)
    exact = F.scaled_dot_product_attention(*(t.detach().bfloat16().double() for t in (q, k, v)))
    out = matmul_attention(*(t.detach().bfloat16() for t in (q, k, v))).double()
    # bf16 scores and probabilities: ~0.35% of the mean magnitude on average (the docstring)
    assert (out - exact).abs().mean() < 0.01 * exact.abs().mean()


def test_bad_masks_are_clear_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="not both"):
        matmul_attention(q, k, v, torch.ones(6, 6, dtype=torch.bool), is_causal=True)
    with pytest.raises(TypeError, match="bool"):
        matmul_attention(q, k, v, torch.zeros(6, 6))


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_refuses_a_float_mask_on_every_kernel(kernel: str, causal: bool) -> None:
    """An additive float mask ran on SDPA in fp32 without is_causal only; the matmul kernel
    and a causal merge failed with unrelated errors.  Every path now names the dtype."""

    attn = Attention(16, 2)
    attn.kernel = kernel
    mask = torch.zeros(1, 1, 5, 5)
    with pytest.raises(TypeError, match=r"attn_mask must be bool \(True = may attend\)"):
        attn(torch.randn(2, 5, 16), attn_mask=mask, is_causal=causal)


def test_auto_picks_matmul_for_short_sequences_on_cpu():
    def pick(n, dtype):
        x = torch.empty(1, 1, n, 8, dtype=dtype)
        return _use_matmul("auto", x, x)

    top = int(MATMUL_MAX_SCORES**0.5)
    assert pick(50, torch.bfloat16) and pick(top, torch.bfloat16) and pick(77, torch.float16)
    assert not pick(top + 1, torch.bfloat16) and not pick(1024, torch.bfloat16)
    assert not pick(50, torch.float32) and not pick(8, torch.float64)  # fp32: SDPA
    x = torch.empty(1, 1, 50, 8, device="meta")
    assert not _use_matmul("auto", x, x)  # not CPU: the fused kernels
    assert _use_matmul("matmul", x, x) and not _use_matmul("sdpa", x[..., :1, :], x)


def test_set_attention_kernel_on_a_model_keeps_outputs_and_gradients():
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=32, patch_size=8, dim=32, depth=2, num_heads=4)
    model = VisionEncoder(cfg).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    results = {}
    for kernel in ("sdpa", "matmul"):
        assert set_attention_kernel(model, kernel) == 2
        assert all(m.kernel == kernel for m in model.modules() if isinstance(m, Attention))
        model.zero_grad()
        out = model.forward_features(x)["pooled"]
        out.square().sum().backward()
        results[kernel] = (out.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results["matmul"][0], results["sdpa"][0], atol=1e-12, rtol=0)
    for a, b in zip(results["matmul"][1], results["sdpa"][1]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="kernel"):
        set_attention_kernel(model, "flash")
