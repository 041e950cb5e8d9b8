"""A bf16 stage-0 checkpoint exports the optimizer's fp32 masters, for every name of a tied
weight (the alias was exported bf16-rounded)."""

from __future__ import annotations

from pathlib import Path

import torch

from mmssl.train.export import _with_fp32_masters


def test_fp32_masters_replace_bf16_weights_and_their_tied_aliases(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    w32 = torch.randn(4, 3, generator=g, dtype=torch.float64).float()
    b32 = torch.randn(3, generator=g)
    w16 = w32.bfloat16()
    module = {"embed.weight": w16, "head.weight": w16, "norm.bias": b32.bfloat16()}
    saved = {
        "module": module,
        "fp32_master_names": [["embed.weight", "norm.bias"]],
        "optimizer": {"fp32_groups": [[w32.clone(), b32.clone()]]},
    }
    state = _with_fp32_masters(saved, tmp_path)
    assert not torch.equal(w16.float(), w32)  # bf16 rounding is visible
    assert torch.equal(state["embed.weight"], w32)
    assert torch.equal(state["head.weight"], w32)  # the tied alias too
    assert torch.equal(state["norm.bias"], b32)


def test_flat_fp32_groups_are_split_by_the_module_shapes(tmp_path: Path):
    a, b = torch.randn(2, 3), torch.randn(5)
    saved = {
        "module": {"a": a.bfloat16(), "b": b.bfloat16()},
        "fp32_master_names": [["a", "b"]],
        "optimizer": {"fp32_groups_flat": [torch.cat([a.flatten(), b])]},
    }
    state = _with_fp32_masters(saved, tmp_path)
    assert torch.equal(state["a"], a) and torch.equal(state["b"], b)
