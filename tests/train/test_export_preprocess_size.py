"""`mmssl export` records the image size the run trained on (data.image_size) in
config.json's preprocess, which evaluation applies, not the model's own default size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import synthetic_recipe

from mmssl.train.export import export_run

pytestmark = pytest.mark.usefixtures("one_process_group")

TRAINED = 48  # test_tiny_clip's own image size is 32


def test_export_records_the_trained_image_size(tmp_path: Path) -> None:
    from mmssl.train.loop import train
    from mmssl.train.recipe import load_recipe, validate

    path = synthetic_recipe(tmp_path, "r", 1)
    recipe = load_recipe(str(path), [f"data.image_size={TRAINED}"])
    train(recipe, validate(recipe))
    out = export_run(tmp_path / "r", tmp_path / "exported")
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert cfg["model"]["vision"]["image_size"] != TRAINED  # the model's own size is another
    assert cfg["preprocess"]["image_size"] == TRAINED

    from mmssl.eval.loading import load_model

    assert load_model(str(out)).preprocess.image_size == TRAINED  # what evaluation applies
