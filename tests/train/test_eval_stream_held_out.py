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


def test_eval_batches_are_not_the_training_batches(tmp_path: Path) -> None:
    from mmssl.train.loop import _eval_loss

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
                "eval": {"every": 1, "batches": 2, "sources": {"train": "held"}},
                "train": {"steps": 2, "global_batch_size": 4, "micro_batch_size": 4},
            }
        )
    )
    recipe = load_recipe(str(path))
    resolved = validate(recipe, world_size=1)
    engine = _Recorder()
    _eval_loss(engine, recipe, resolved, torch.device("cpu"), torch.float32)
    assert len(engine.batches) == 2
    train = build_streams(recipe, resolved.model, 0, 1)["train"]  # what the run trains on
    for got in engine.batches:
        trained = train.next()
        assert got["train"]["image"].shape == trained["image"].shape
        assert not torch.equal(got["train"]["image"].float(), trained["image"].float())
