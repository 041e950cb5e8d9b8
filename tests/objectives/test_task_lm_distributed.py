"""The training Task's LM objectives (next_token, captioning; fused head and not) are exact
under data parallelism: 2 gloo ranks with different numbers of real (unpadded) caption
tokens give the loss and the rank-averaged gradients of one process on the whole batch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from distributed_utils import run_distributed

import mmssl
from mmssl import distributed
from mmssl.train.recipe import ObjectiveConfig
from mmssl.train.tasks import Task

pytestmark = pytest.mark.distributed
B, T = 6, 12


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 512, (B, T), generator=g)
    lengths = torch.tensor([12, 11, 10, 3, 2, 4])  # rank 0 holds 33 tokens, rank 1 holds 9
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return {"image": torch.rand(B, 3, 32, 32, generator=g), "text": text * mask, "text_mask": mask}


def _task(fused: bool) -> Task:
    torch.manual_seed(0)
    model = mmssl.create_model("test_tiny_coca")
    objectives = {
        "captioning": ObjectiveConfig(source="s", fused_head=fused),
        "next_token": ObjectiveConfig(source="s", fused_head=fused, weight=0.5),
    }
    return Task(model, objectives).eval()  # eval: no dropout / drop_path


def _run(lo: int, hi: int) -> dict[str, Any]:
    out = {}
    for fused in (True, False):
        task = _task(fused)
        batch = {k: v[lo:hi] for k, v in _batch().items()}
        loss, metrics = task({"s": batch})
        loss.backward()
        grads = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
        if distributed.world_size() > 1:  # the engine's gradient average over ranks
            for g in grads.values():
                torch.distributed.all_reduce(g)
                g /= distributed.world_size()
        out[fused] = {"loss": loss.item(), **{f"g/{n}": g for n, g in grads.items()}}
        out[fused].update({k: v.item() for k, v in metrics.items() if k.startswith("loss/")})
    return out


def _ranks() -> dict[str, Any]:
    half = B // 2
    r = distributed.rank()
    return _run(r * half, (r + 1) * half)


def test_lm_objectives_are_exact_on_two_ranks() -> None:
    single = _run(0, B)
    per_rank = run_distributed(_ranks, 2)
    for fused in (True, False):
        ref = single[fused]
        assert ref["g/model.caption.decoder.blocks.0.attn.qkv.weight"].abs().sum() > 0
        for rank in per_rank:
            got = rank[fused]
            assert got.keys() == ref.keys()
            for k, v in ref.items():
                if isinstance(v, float):
                    assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (fused, k)
                else:
                    torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-6, msg=k)
