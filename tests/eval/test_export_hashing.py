"""Exporting the newest good checkpoint hashes each of its files once: `newest_valid` has
verified it, and the export's own manifest check hashed it all a second time (a checkpoint
with its optimizer state can be many GB).  `mmssl eval RUN_DIR` whose export already holds
the newest good checkpoint does not hash that one again when a newer one is damaged."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

import mmssl.train.checkpoint as checkpoint
from mmssl.eval import loading
from mmssl.models.multimodal import MultimodalModel
from mmssl.train import export
from mmssl.train.checkpoint import tag_of, write_manifest
from mmssl.train.recipe import model_config, recipe_from_dict
from mmssl.train.tasks import Task

RECIPE = {"name": "h", "model": {"name": "test_tiny_clip"}, "objectives": {"clip": {}}}


def _save(run: Path, step: int, task: Task) -> Path:
    """A stage-0 checkpoint of `task` as the loop saves it (model states + manifest)."""
    folder = run / "checkpoints" / tag_of(step)
    folder.mkdir(parents=True)
    torch.save({"module": task.state_dict()}, folder / "mp_rank_00_model_states.pt")
    (folder / "extra.bin").write_bytes(bytes(range(256)) * 64)
    write_manifest(folder, step)
    return folder


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(json.dumps(RECIPE))  # JSON is YAML
    torch.manual_seed(0)
    _save(run, 1, Task(MultimodalModel(model_config(recipe_from_dict(RECIPE))), {}))
    return run


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts the files `verify` hashes, by (tag, file name)."""
    counts: Counter = Counter()
    digest = checkpoint._digest

    def counting(path: Path, flush: bool = False) -> tuple[int, str]:
        counts[(path.parent.name, path.name)] += 1
        return digest(path, flush)

    monkeypatch.setattr(checkpoint, "_digest", counting)
    return counts


def test_export_of_the_newest_good_checkpoint_hashes_it_once(run: Path, hashed: Counter) -> None:
    out = export.export_run(run, run / "out")
    assert json.loads((out / "config.json").read_text())["checkpoint"] == tag_of(1)
    names = ["extra.bin", "mp_rank_00_model_states.pt"]
    assert hashed == Counter({(tag_of(1), n): 1 for n in names})
    # a tag named by the caller is still checked against its manifest
    hashed.clear()
    export.export_run(run, run / "out2", tag_of(1))
    assert hashed == Counter({(tag_of(1), n): 1 for n in names})


def test_eval_of_a_run_dir_hashes_the_exported_checkpoint_once(run: Path, hashed: Counter) -> None:
    # a newer checkpoint, damaged: the same size, one bit flipped
    newer = run / "checkpoints" / tag_of(2)
    shutil.copytree(run / "checkpoints" / tag_of(1), newer)
    (newer / "manifest.json").write_text(
        (newer / "manifest.json").read_text().replace('"step": 1', '"step": 2')
    )
    data = bytearray((newer / "extra.bin").read_bytes())
    data[100] ^= 1
    (newer / "extra.bin").write_bytes(bytes(data))

    out = loading.export_run(run)
    assert json.loads((out / "config.json").read_text())["checkpoint"] == tag_of(1)
    good = [(tag_of(1), n) for n in ("extra.bin", "mp_rank_00_model_states.pt")]
    assert all(hashed[k] == 1 for k in good), hashed  # not again by the export
    for _ in range(2):  # the export is reused, and its checkpoint is not hashed again
        hashed.clear()
        assert loading.export_run(run) == out
        assert not any(k in hashed for k in good), hashed
        assert hashed[(tag_of(2), "extra.bin")] == 1  # the damaged one is still checked


def test_eval_of_a_run_dir_says_when_it_replaces_an_export_of_another_checkpoint(
    run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """RUN_DIR/export of step 1 (`mmssl export --tag`) is replaced by step 2's, and said so."""
    torch.manual_seed(1)
    _save(run, 2, Task(MultimodalModel(model_config(recipe_from_dict(RECIPE))), {}))
    export.export_run(run, run / "export", tag_of(1))
    with caplog.at_level("WARNING", logger="mmssl.eval"):
        out = loading.export_run(run)
    assert json.loads((out / "config.json").read_text())["checkpoint"] == tag_of(2)
    assert f"{run / 'export'} holds an export of another checkpoint, or files" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmssl.eval"):
        assert loading.export_run(run) == out  # reused: nothing replaced, nothing said
    assert "replacing" not in caplog.text


@pytest.mark.parametrize(
    "tag", ["../../other/checkpoints/step_00000001", "step_1", "latest", "x/step_00000001"]
)
def test_export_refuses_a_tag_that_is_no_checkpoint_of_the_run(run: Path, tag: str) -> None:
    """A path as --tag exported another run's weights into this run's export."""
    from mmssl.schema import ConfigError

    other = run.parent / "other"
    shutil.copytree(run, other)
    with pytest.raises(ConfigError, match="is no checkpoint tag"):
        export.export_run(run, run / "out", tag)
    assert not (run / "out").exists()


@pytest.mark.parametrize("form", ["step_00000001/", "{run}/checkpoints/step_00000001"])
def test_export_takes_a_path_to_one_of_the_runs_own_checkpoints(run: Path, form: str) -> None:
    out = export.export_run(run, run / "out", form.format(run=run))
    assert json.loads((out / "config.json").read_text())["checkpoint"] == tag_of(1)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_eval_of_a_run_dir_exports_again_when_the_exports_files_changed(
    run: Path, name: str
) -> None:
    """A byte of RUN_DIR/export changed after the export (a bit flip, an edit): it was reused
    and scored as the checkpoint's weights; its files are hashed at export and checked."""
    from safetensors.torch import load_file

    out = loading.export_run(run)
    # cloned: load_file maps the file, whose bytes are changed in place below
    weights = {k: v.clone() for k, v in load_file(str(out / "model.safetensors")).items()}
    path = out / name
    data = bytearray(path.read_bytes())
    at = len(data) - 9 if name == "model.safetensors" else data.index(b'"checkpoint"') + 1
    data[at] ^= 0x01  # a weight's low mantissa bit / a key's letter: still loads
    path.write_bytes(bytes(data))
    assert loading.export_run(run) == out
    again = load_file(str(out / "model.safetensors"))
    assert again.keys() == weights.keys()
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    assert json.loads((out / "config.json").read_text())["checkpoint"] == tag_of(1)
