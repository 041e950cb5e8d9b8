"""The periodic eval loss is measured on held-out batches: a synthetic held-out source's
eval stream (built by the loop's `_eval_loss`) draws other samples than the training
stream, not the very batches the run just trained on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mmssl.train.recipe import load_recipe, validate
from mmssl.train.streams import build_streams

pytestmark = pytest.mark.usefixtures("one_process_group")


class _Recorder:
    """An engine stand-in that keeps the batches `_eval_loss` feeds it."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []

    def eval(self) -> None:
        pass

    def train(self) -> None:
        pass

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.batches.append(batch)
        return torch.zeros(()), {"loss/clip": torch.zeros(())}


def _held_out_recipe(tmp_path: Path, batches: int) -> str:
    path = tmp_path / "h.yaml"
    path.write_text(
        json.dumps(
            {
                "out_dir": str(tmp_path),
                "model": {"name": "test_tiny_clip"},
                "data": {
                    "sources": {"train": {"urls": "synthetic"}, "held": {"urls": "synthetic"}}
                },
                "objectives": {"clip": {"source": "train"}},
                "eval": {"every": 1, "batches": batches, "sources": {"train": "held"}},
                "train": {"steps": 2, "global_batch_size": 4, "micro_batch_size": 4},
            }
        )
    )
    return str(path)


def test_eval_batches_are_not_the_training_batches(tmp_path: Path) -> None:
    from mmssl.train.loop import _eval_loss

    recipe = load_recipe(_held_out_recipe(tmp_path, batches=2))
    resolved = validate(recipe, world_size=1)
    engine = _Recorder()
    _eval_loss(engine, recipe, resolved, torch.device("cpu"), torch.float32)
    assert len(engine.batches) == 2
    train = build_streams(recipe, resolved.model, 0, 1)["train"]  # what the run trains on
    for got in engine.batches:
        trained = train.next()
        assert got["train"]["image"].shape == trained["image"].shape
        assert not torch.equal(got["train"]["image"].float(), trained["image"].float())


class _Counting(_Recorder):
    """An engine stand-in whose n-th batch measures a loss of n."""

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        super().__call__(batch)
        n = float(len(self.batches))
        return torch.tensor(n), {"loss/clip": torch.tensor(n)}


def test_the_eval_loss_is_the_mean_over_its_batches(tmp_path: Path) -> None:
    """Losses 1, 2, 3 over eval.batches=3 give 2 (a sum, or one batch's, passed the tests,
    which ran a single eval batch)."""
    from mmssl.train.loop import _eval_loss

    recipe = load_recipe(_held_out_recipe(tmp_path, batches=3))
    out = _eval_loss(
        _Counting(), recipe, validate(recipe, world_size=1), torch.device("cpu"), torch.float32
    )
    assert out == {"eval/loss/clip": pytest.approx(2.0)}
