"""Pooled-only forwards against the full forward they shortcut.

A caller that reads one row per sample (a class token, the end of a text) gets it with the
last block computing that row only (`Transformer` rows, the towers' `forward_pooled`).
The reference is the full forward, which the interop tests hold to timm, open_clip and
Hugging Face: the same rows, the same gradients, under every option that changes which keys
a row attends to (masks, causal, rotary positions, conditioning, prefix tokens).
"""

from __future__ import annotations

import pytest
import torch

import mmssl
from mmssl.nn import RotaryEmbedding, Transformer
from mmssl.nn.kv_cache import KVCache
from mmssl.train.recipe import ObjectiveConfig
from mmssl.train.tasks import Task


def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """Every weight moved off its init, so that zero-init gates and scales pass a signal."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d input, zeros for an input the loss does not use (a tower's projection)."""
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "shared", "per_sample"])
@pytest.mark.parametrize("options", ["plain", "cond_rope", "checkpointed_drop_path"])
def test_transformer_rows_are_the_full_outputs_rows(causal, mask, options):
    torch.manual_seed(0)
    b, n, d = 3, 7, 16
    cond_dim = 5 if options == "cond_rope" else None
    t = Transformer(
        d,
        2,
        2,
        causal=causal,
        cond_dim=cond_dim,
        drop_path=0.5 if options == "checkpointed_drop_path" else 0.0,
        grad_checkpointing=options == "checkpointed_drop_path",
    )
    t = _perturbed(t.double()).train()
    x = torch.randn(b, n, d, dtype=torch.double, requires_grad=True)
    cond = torch.randn(b, 5, dtype=torch.double, requires_grad=True) if cond_dim else None
    rope = RotaryEmbedding(d // 2)(torch.arange(n)) if options == "cond_rope" else None
    g = torch.Generator().manual_seed(2)
    attn_mask = None
    if mask == "shared":  # (N, N): every query keeps itself and a random half of the keys
        attn_mask = (torch.rand(n, n, generator=g) < 0.5) | torch.eye(n, dtype=torch.bool)
    elif mask == "per_sample":  # (B, 1, 1, N): padding keys per sample
        attn_mask = (torch.arange(n) < torch.tensor([7, 4, 2])[:, None])[:, None, None]
    rows = torch.tensor([0, 3, 6])
    kw = dict(cond=cond, attn_mask=attn_mask, rope=rope)
    torch.manual_seed(3)  # the same drop-path draws on both sides
    full = t(x, **kw)[torch.arange(b), rows]
    torch.manual_seed(3)
    got = t(x, rows=rows, **kw)
    assert got.shape == (b, 1, d)
    torch.testing.assert_close(got[:, 0], full, rtol=1e-12, atol=1e-12)
    w = torch.randn(b, d, dtype=torch.double, generator=g)
    inputs = [x] + ([cond] if cond is not None else []) + list(t.parameters())
    torch.manual_seed(3)
    want = _grads((t(x, **kw)[torch.arange(b), rows] * w).sum(), inputs)
    torch.manual_seed(3)
    for a, e in zip(_grads((t(x, rows=rows, **kw)[:, 0] * w).sum(), inputs), want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_rows_are_refused_where_they_cannot_hold():
    t = Transformer(16, 1, 2, causal=True)
    x = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match=r"rows must be \(B,\)"):
        t(x, rows=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"rows must be \(B,\)"):
        t(x, rows=torch.tensor([0.0, 1.0]))
    deep = Transformer(16, 2, 2, causal=True)
    cache = KVCache(2, 8)
    with pytest.raises(ValueError, match="without a kv cache"):
        deep(x, rows=torch.tensor([0, 1]), kv_cache=cache)
    assert cache.length == 0  # refused before a block appended to its cache
    empty = Transformer(16, 0, 2)  # no block: the rows of the input
    torch.testing.assert_close(empty(x, rows=torch.tensor([3, 1])), x[[0, 1], [3, 1]][:, None])


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "vision": {"cond_tokens": 2},
            "condition": {"dim": 8},
        },  # prefix tokens after the class token
        {"vision": {"cond_dim": 8}, "condition": {"dim": 8}},  # adaLN-Zero blocks
        {"vision": {"attn_window": 1}},  # a local-window mask
        {"vision": {"pos_embed": "rope"}},
        {"vision": {"pool": "mean"}},  # nothing to skip: the same features
    ],
    ids=["plain", "cond_tokens", "adaln", "local_window", "rope", "mean_pool"],
)
def test_vision_pooled_only_is_the_full_pooled_and_its_gradients(overrides):
    torch.manual_seed(0)
    model = _perturbed(mmssl.create_model("test_tiny_vit", **overrides).double()).train()
    images = torch.rand(3, 3, 32, 32, dtype=torch.double)
    cond = None
    if "condition" in overrides:
        cond = model.condition(torch.rand(3, 13, dtype=torch.double))
    full = model.forward_features(images, cond)["pooled"]
    torch.testing.assert_close(model.forward_pooled(images, cond), full, rtol=1e-12, atol=1e-12)
    w = torch.randn(full.shape, dtype=torch.double)
    params = list(model.visual.parameters())
    want = _grads((model.forward_features(images, cond)["pooled"] * w).sum(), params)
    got_g = _grads((model.forward_pooled(images, cond) * w).sum(), params)
    for a, e in zip(got_g, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padding", ["right", "none"])
def test_text_pooled_only_is_the_pooled_end_of_text(causal, padding):
    torch.manual_seed(0)
    model = _perturbed(mmssl.create_model("test_tiny_clip", text={"causal": causal}).double())
    text = torch.randint(3, 512, (4, 9))
    mask = None
    if padding == "right":
        mask = torch.arange(9)[None] < torch.tensor([[9], [5], [1], [7]])
    tower = model.text
    full = tower.pool(tower.forward_tokens(text, mask), mask)
    torch.testing.assert_close(tower.forward_pooled(text, mask), full, rtol=1e-12, atol=1e-12)
    # encode_text takes the same path, after trimming the all-padding columns
    torch.testing.assert_close(
        model.encode_text(text, mask), tower.proj(full), rtol=1e-12, atol=1e-12
    )
    w = torch.randn(full.shape, dtype=torch.double)
    params = list(tower.parameters())
    want = _grads((tower.pool(tower.forward_tokens(text, mask), mask) * w).sum(), params)
    got_g = _grads((tower.forward_pooled(text, mask) * w).sum(), params)
    for a, e in zip(got_g, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_a_training_step_reading_pooled_features_is_that_of_the_full_forward(monkeypatch):
    """CLIP and SimCLR read pooled features only, so the Task asks for those; forced to ask
    for every token (as it does for hssl or captioning), the losses and gradients agree."""
    torch.manual_seed(0)
    model = _perturbed(mmssl.create_model("test_tiny_clip").double())
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 512, (6, 10), generator=g)
    batch = {
        "pairs": {
            "image": torch.rand(6, 3, 32, 32, generator=g, dtype=torch.double),
            "text": text,
            "text_mask": torch.arange(10)[None] < torch.tensor([[10], [7], [5], [9], [3], [10]]),
        },
        "views": {"views": [torch.rand(6, 3, 32, 32, generator=g, dtype=torch.double)] * 2},
    }
    objectives = {
        "clip": ObjectiveConfig(type="clip", source="pairs"),
        "simclr": ObjectiveConfig(type="simclr", source="views"),
    }
    task = Task(model, objectives).double()
    asked = []  # which vision method each step called
    for name in ("forward_features", "forward_pooled"):
        method = getattr(type(model.visual), name)

        def spy(self, *args, _name=name, _method=method, **kwargs):
            asked.append(_name)
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(type(model.visual), name, spy)

    def step() -> tuple[dict[str, float], list[torch.Tensor]]:
        task.zero_grad()
        loss, metrics = task(batch)
        loss.backward()
        return {k: float(v) for k, v in metrics.items()}, [
            p.grad.clone() for p in model.parameters() if p.grad is not None
        ]

    pooled_metrics, pooled_grads = step()
    assert asked == ["forward_pooled"]
    monkeypatch.setattr(Task, "_reads", lambda self, kinds, source=None: True)
    full_metrics, full_grads = step()
    assert asked == ["forward_pooled", "forward_features"]
    assert pooled_metrics == pytest.approx(full_metrics, rel=1e-12, abs=1e-12)
    assert len(pooled_grads) == len(full_grads) > 0
    for a, e in zip(pooled_grads, full_grads):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
