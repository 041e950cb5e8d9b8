"""Gradient accumulation keeps the LM objectives' token mean exact: a step of ragged captions
(micro-batches with very different numbers of target tokens) trained through `train()` with
grad_accum 2 ends on the weights, and logs the losses, of one plain-PyTorch step on the whole
batch at once (the naive reference: one big batch, torch AdamW).  On 1 process (2 x 2) and on
2 gloo ranks (2 ranks x 2 micro-batches of 1 row)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed_utils import run_distributed

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_process_group")]
ROWS, T = 4, 16
# the first half of the step's rows holds 28 targets, the second 3: averaging two
# micro-batch token means would weigh a token of the short captions ~9x more
LENGTHS = [16, 14, 3, 2]
# AdamW's first update is lr * g / (|g| + eps): with eps >> |g| it is ~ lr / eps * g, so the
# weights after one step follow the gradient's size, not just its sign
LR, EPS = 1e3, 1e3


def _rows() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 512, (ROWS, T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    return {
        "image": torch.rand(ROWS, 3, 32, 32, generator=g),
        "text": text * mask,
        "text_mask": mask,
    }


class _RaggedStream:
    """The rows of `_rows`, cycled: micro-batch `index` of `rank` is rows
    (index * world + rank) * micro ... + micro, so every step covers all of them once."""

    def __init__(self, micro: int, rank: int, world: int) -> None:
        self.micro, self.rank, self.world, self.index = micro, rank, world, 0

    def next(self) -> dict[str, Any]:
        start = (self.index * self.world + self.rank) * self.micro % ROWS
        self.index += 1
        return {k: v[start : start + self.micro].clone() for k, v in _rows().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])

    @property
    def skipped(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


def _recipe(out_dir: str, name: str, micro: int, zero: str = "zero0") -> Any:
    from mmssl.train.recipe import recipe_from_dict

    return recipe_from_dict(
        {
            "name": name,
            "out_dir": out_dir,
            "model": {"name": "test_tiny_coca"},
            "data": {"sources": {"train": {"urls": "synthetic"}}},
            "objectives": {"captioning": {}, "next_token": {"weight": 0.5}},
            "optim": {"lr": LR, "eps": EPS, "weight_decay": 0.0, "impl": "torch"},
            "schedule": {"kind": "constant"},
            "train": {
                "steps": 1,
                "global_batch_size": ROWS,
                "micro_batch_size": micro,
                "grad_clip": None,
                "deepspeed": zero,
            },
            "logging": {"every": 1, "tensorboard": False, "progress": False},
        }
    )


def _run(out_dir: str, name: str, micro: int, zero: str = "zero0") -> dict[str, Any]:
    """One step of `train()` on the ragged rows -> its grad_accum, weights and logged row."""
    import deepspeed

    from mmssl import distributed
    from mmssl.train import loop
    from mmssl.train.recipe import validate

    recipe = _recipe(out_dir, name, micro, zero)
    resolved = validate(recipe, world_size=distributed.world_size())
    build = loop.build_streams
    loop.build_streams = lambda recipe, model, rank, world: {
        "train": _RaggedStream(micro, rank, world)
    }
    try:
        out = loop.train(recipe, resolved)
    finally:
        loop.build_streams = build
    row = json.loads((Path(out_dir) / name / "metrics.jsonl").read_text().splitlines()[0])
    module = out["engine"].module
    with deepspeed.zero.GatheredParameters(list(module.parameters())):  # ZeRO-3's partitions
        weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {"grad_accum": out["grad_accum"], "weights": weights, "row": row}


def _reference(out_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One torch AdamW step of a plain Task on all the rows at once -> (weights, losses)."""
    from mmssl.models.multimodal import MultimodalModel
    from mmssl.train.engine import param_groups
    from mmssl.train.loop import seed_everything
    from mmssl.train.recipe import validate
    from mmssl.train.streams import tokenizer
    from mmssl.train.tasks import Task

    recipe = _recipe(out_dir, "reference", ROWS)
    resolved = validate(recipe, world_size=1)
    seed_everything(recipe.train.seed)  # the loop's initial weights
    task = Task(MultimodalModel(resolved.model), recipe.objectives, tokenizer(recipe))
    o = recipe.optim
    opt = torch.optim.AdamW(param_groups(task, 0.0), lr=o.lr, betas=o.betas, eps=o.eps)
    loss, metrics = task({"train": _rows()})
    loss.backward()
    opt.step()
    weights = {k: v.detach().clone() for k, v in task.state_dict().items()}
    return weights, {k: float(v) for k, v in metrics.items() if k.startswith("loss")}


def _check(
    got: dict[str, Any],
    weights: dict[str, torch.Tensor],
    losses: dict[str, float],
    grad_accum: int = 2,
) -> None:
    assert got["grad_accum"] == grad_accum
    assert got["weights"].keys() == weights.keys()
    for k, v in weights.items():
        torch.testing.assert_close(got["weights"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for k, v in losses.items():
        assert got["row"][k] == pytest.approx(v, rel=1e-5), k


@pytest.mark.parametrize("zero", ["zero0", "zero3"])
def test_accumulated_captions_train_like_one_big_batch(zero: str, tmp_path: Path) -> None:
    weights, losses = _reference(str(tmp_path))
    _check(_run(str(tmp_path), "accum", 2, zero), weights, losses)


def test_one_micro_batch_trains_like_one_big_batch(tmp_path: Path) -> None:
    """grad_accum 1 through the loop: the same step (the reference checks itself here)."""
    weights, losses = _reference(str(tmp_path))
    _check(_run(str(tmp_path), "big", ROWS), weights, losses, grad_accum=1)


def _two_ranks(out_dir: str) -> dict[str, Any]:
    from mmssl import distributed

    torch.set_num_threads(1)  # two ranks on the test machine's cores
    got = _run(out_dir, "ranks", 1)
    distributed.barrier()
    return got


@pytest.mark.distributed
def test_accumulated_captions_on_two_ranks_train_like_one_big_batch(tmp_path: Path) -> None:
    weights, losses = _reference(str(tmp_path))
    for got in run_distributed(_two_ranks, 2, str(tmp_path), timeout=300):
        _check(got, weights, losses)
