"""A recipe's model named by a JSON file edited (or deleted) after training: the run record
keeps the model the run built, a resume that would build another is refused, and the export
builds the recorded one (it re-read the file: an edited activation resumed silently and was
exported under the new name, a changed width failed in DeepSpeed's load)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import synthetic_recipe

from mmssl.models.io import load_pretrained
from mmssl.models.registry import CONFIG_DIR
from mmssl.schema import ConfigError
from mmssl.train.checkpoint import list_tags, tag_of
from mmssl.train.export import export_run

pytestmark = pytest.mark.usefixtures("one_process_group")


def _train(path: Path, *overrides: str) -> None:
    from mmssl.train.loop import train
    from mmssl.train.recipe import load_recipe, validate

    recipe = load_recipe(str(path), list(overrides))
    train(recipe, validate(recipe))


def _run_with_model_file(tmp_path: Path) -> tuple[Path, Path]:
    """2 of 4 steps of a tiny CLIP whose model is a copy of test_tiny_clip.json."""
    model = tmp_path / "m.json"
    shutil.copy(CONFIG_DIR / "test_tiny_clip.json", model)
    path = synthetic_recipe(tmp_path, "r", 4, stop_at=2)
    recipe = json.loads(path.read_text())
    recipe["model"] = {"name": str(model)}
    path.write_text(json.dumps(recipe))
    _train(path)
    return path, model


def _edit(model: Path, tower: str, **values: object) -> None:
    data = json.loads(model.read_text())
    data[tower].update(values)
    model.write_text(json.dumps(data))


def test_a_resume_refuses_a_model_file_edited_since(tmp_path: Path) -> None:
    path, model = _run_with_model_file(tmp_path)
    ckpts = tmp_path / "r" / "checkpoints"
    original = model.read_text()
    _edit(model, "vision", block={"act": "relu"})
    with pytest.raises(ConfigError, match=r"^model\.vision\.block\.act is 'relu' but .* 'gelu'"):
        _train(path, "train.stop_at=4")
    model.write_text(original)
    _edit(model, "vision", depth=3)  # a shape: DeepSpeed's load failed with a traceback
    with pytest.raises(ConfigError, match=r"^model\.vision\.depth is 3 but .* with 2"):
        _train(path, "train.stop_at=4")
    assert list_tags(ckpts) == [tag_of(1), tag_of(2)]  # refused before anything was written
    model.write_text(original)
    _train(path, "train.stop_at=4")  # the model it was trained with resumes
    assert list_tags(ckpts)[-1] == tag_of(4)


def test_the_export_builds_the_recorded_model(tmp_path: Path) -> None:
    _, model = _run_with_model_file(tmp_path)
    run = tmp_path / "r"
    reference = load_pretrained(export_run(run, tmp_path / "before"))
    _edit(model, "vision", block={"act": "relu"})
    edited = export_run(run, tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    assert config["model"]["vision"]["block"]["act"] == "gelu"
    model.unlink()  # and a run whose model file is gone still exports
    gone = load_pretrained(export_run(run, tmp_path / "gone"))
    assert gone.cfg == reference.cfg
    for (name, value), kept in zip(gone.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, kept), name
