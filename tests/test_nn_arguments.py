"""Arguments the building blocks used to accept and then compute something else with: each
is refused now, with a message naming it, and the valid neighbour still works."""

from __future__ import annotations

import pytest
import torch

from mmssl.models import create_model
from mmssl.nn import (
    Attention,
    ConditionedGate,
    ConditionedNorm,
    LayerKVCache,
    RotaryEmbedding,
    Transformer,
    apply_rotary,
)
from mmssl.nn.linear_ce import linear_cross_entropy
from mmssl.objectives.lm import next_token_sum
from mmssl.schema import ConfigError


def test_a_rotary_table_longer_than_the_positions_is_refused_before_the_cache_grows() -> None:
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 2, 1, 8)
    with pytest.raises(ValueError, match="rotary table has 3 positions, more than x's 1"):
        apply_rotary(x, rope(torch.arange(3)))  # returned 3 positions for 1
    prefix = torch.randn(1, 2, 5, 8)  # more positions than the table: the first stay as they are
    out = apply_rotary(prefix, rope(torch.arange(3)))
    torch.testing.assert_close(out[:, :, :2], prefix[:, :, :2])

    attn, cache = Attention(16, 2), LayerKVCache(8)
    attn(torch.randn(1, 2, 16), rope=rope(torch.arange(2)), kv_cache=cache)
    with pytest.raises(ValueError, match="rotary table"):
        attn(torch.randn(1, 1, 16), rope=rope(torch.arange(3)), kv_cache=cache)
    assert cache.length == 2  # the failed step appended nothing


@pytest.mark.parametrize("cond_depth", [0, -1, 3])
def test_cond_depth_outside_one_to_depth_is_refused(cond_depth: int) -> None:
    # 0 or less conditioned no block, cond accepted and ignored; 3 of 2 conditioned all
    with pytest.raises(ValueError, match=r"cond_depth must be in \[1, depth=2\]"):
        Transformer(16, 2, 2, cond_dim=4, cond_depth=cond_depth)
    with pytest.raises(ConfigError, match="model.vision.cond_depth must be"):
        create_model("test_tiny_vit_cond", vision={"cond_depth": cond_depth})
    conditioned = Transformer(16, 2, 2, cond_dim=4, cond_depth=2)
    assert all(isinstance(b.norm1, ConditionedNorm) for b in conditioned.blocks)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"vision": {"block": {"norm_eps": -1.0}}}, "model.vision.block.norm_eps must be > 0"),
        ({"vision": {"block": {"mlp_ratio": 0}}}, "model.vision.block.mlp_ratio must be > 0"),
        ({"vision": {"num_heads": 0}}, "num_heads must be positive"),
        ({"vision": {"block": {"norm_eps": float("nan")}}}, "must be a finite number"),
        ({"init_std": 0.0}, "model.init_std must be > 0"),
    ],
)
def test_create_model_checks_values_as_a_recipe_does(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create_model("test_tiny_vit", **overrides)


def test_drop_path_bounds_agree_across_the_checks() -> None:
    """check_values took [0, 1) where BlockConfig and Transformer take [0, 1]: a rate of 1
    built before create_model ran the value checks, and still does."""
    create_model("test_tiny_vit", **{"vision.block.drop_path": 1.0})
    with pytest.raises(ConfigError, match=r"drop_path must be in \[0, 1\]"):
        create_model("test_tiny_vit", **{"vision.block.drop_path": 1.5})


def test_a_kv_cache_refuses_keys_of_another_batch() -> None:
    cache = LayerKVCache(6)
    cache.append(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))
    with pytest.raises(ValueError, match=r"kv cache holds \(B, H, d\) = \(3, 2, 4\)"):
        cache.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))  # broadcast to every row
    assert cache.length == 1


def test_attention_refuses_what_its_kind_ignores() -> None:
    cross = Attention(16, 2, cross=True, context_dim=8)
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 5, 8)
    cross(x, context=ctx)
    with pytest.raises(ValueError, match="is_causal and rope are for self-attention"):
        cross(x, context=ctx, is_causal=True)  # query 0 saw context key 0 only
    with pytest.raises(ValueError, match="is for cross-attention"):
        Attention(16, 2)(x, context=torch.randn(2, 5, 16))  # was ignored
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        Attention(16, 0)


@pytest.mark.parametrize("module", [ConditionedNorm(8, 4), ConditionedGate(8, 4)])
def test_a_condition_is_one_row_per_sample(module: torch.nn.Module) -> None:
    x = torch.randn(3, 5, 8)
    linear = module.modulation if isinstance(module, ConditionedNorm) else module.gate
    torch.nn.init.normal_(linear.weight)
    one = torch.randn(1, 4)
    torch.testing.assert_close(module(x, one), module(x, one.expand(3, 4)))
    with pytest.raises(ValueError, match=r"cond must be \(B, C\) or \(1, C\)"):
        module(x, torch.randn(3, 1, 4))  # broadcast the output to (3, 3, 5, 8)
    with pytest.raises(ValueError, match=r"cond must be \(B, C\)"):
        module(x, torch.randn(2, 4))


@pytest.mark.parametrize("smoothing", [1.5, -0.5, float("nan"), True, "0.1"])
def test_label_smoothing_outside_zero_to_one_is_refused_on_both_paths(smoothing) -> None:
    hidden, weight = torch.randn(4, 8), torch.randn(11, 8)
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\)"):
        linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, 4]), label_smoothing=smoothing)
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\)"):
        next_token_sum(
            torch.randn(1, 4, 11), torch.tensor([[1, 2, 3, 4]]), label_smoothing=smoothing
        )


def test_linear_cross_entropy_refuses_integer_logits_and_non_integer_targets() -> None:
    weight, targets = torch.randn(11, 8), torch.tensor([1, 2, 3, 4])
    with pytest.raises(TypeError, match="hidden and weight must be floating point"):
        linear_cross_entropy(torch.ones(4, 8, dtype=torch.int64), weight, targets)
    for bad in (targets.bool(), targets.float(), targets.to(torch.uint8), targets.short()):
        with pytest.raises(TypeError, match="targets must be int64 or int32 token ids"):
            linear_cross_entropy(torch.randn(4, 8), weight, bad)
    linear_cross_entropy(torch.randn(4, 8), weight, targets.int())
