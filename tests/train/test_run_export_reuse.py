"""`mmssl eval`/`features --model RUN_DIR` reuse RUN_DIR/export only while it holds the very
checkpoint that is newest: a run trained anew in the same directory (its checkpoints moved
away) saves other weights under the same tags, and the stale export, matched by its tag
name alone, was evaluated in their place."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_helpers import synthetic_recipe

from mmssl.eval.loading import resolve_model_dir
from mmssl.train.export import export_run

pytestmark = pytest.mark.usefixtures("one_process_group")


def _train(path: Path, *overrides: str) -> None:
    from mmssl.train.loop import train
    from mmssl.train.recipe import load_recipe, validate

    recipe = load_recipe(str(path), list(overrides))
    train(recipe, validate(recipe))


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


def test_an_export_of_a_replaced_checkpoint_of_the_same_tag_is_redone(tmp_path: Path) -> None:
    path = synthetic_recipe(tmp_path, "r", 2)
    run = tmp_path / "r"
    _train(path)
    first = resolve_model_dir(run)
    assert first == run / "export"
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(run) == first  # the same checkpoint: reused, not written again
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    shutil.rmtree(run / "checkpoints")
    _train(path, "train.seed=1")  # step_00000002 again, other weights
    fresh = export_run(run, tmp_path / "fresh")
    assert not _same_weights(run / "export", fresh)  # RUN_DIR/export is stale now
    assert resolve_model_dir(run) == run / "export"
    assert _same_weights(run / "export", fresh)


def test_a_run_directory_that_cannot_be_written_is_one_error_naming_the_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export to redo (one from before exports named their checkpoint) in a run directory
    the user cannot write: a SafetensorError / PermissionError traceback before."""
    import mmssl.train.export
    from mmssl.eval.loading import EvalError

    path = synthetic_recipe(tmp_path, "r", 1)
    run = tmp_path / "r"
    _train(path)

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(run / "export"))

    monkeypatch.setattr(mmssl.train.export, "export_run", refuse)
    with pytest.raises(EvalError, match=r"cannot write .*export.*mmssl export .* --out DIR"):
        resolve_model_dir(run)


def test_an_export_into_a_checkpoint_or_over_a_run_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Into a checkpoint folder (this run's or another's) it broke that checkpoint's manifest
    (a resume then saved over it: the trained state lost); over the run directory, `--model RUN_DIR` took it for the
    run's export even after newer checkpoints."""
    from mmssl.train.checkpoint import newest_valid
    from mmssl.train.export import main

    _train(synthetic_recipe(tmp_path, "r", 2))
    run = tmp_path / "r"
    before = sorted(p.name for p in run.iterdir())
    step = run / "checkpoints" / "step_00000002"
    for out in (step, run / "checkpoints", run, run / "checkpoints" / ".."):
        assert main([str(run), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--out {out} is" in err and "Traceback" not in err
    assert newest_valid(run / "checkpoints", "test", collective=False) == "step_00000002"
    assert sorted(p.name for p in run.iterdir()) == before
    # another run's checkpoints: accepted before, where that run's resume or rotation removed it
    other = tmp_path / "other"
    (other / "checkpoints" / "step_00000001").mkdir(parents=True)
    (other / "recipe.yaml").write_text("{}\n")
    for out in (other / "checkpoints" / "step_00000001", other / "checkpoints" / "new"):
        assert main([str(run), "--out", str(out)]) == 2
        assert "inside a run's checkpoints" in capsys.readouterr().err
    assert not (other / "checkpoints" / "new").exists()
    # a run whose checkpoints/ links to scratch storage: its real path names no checkpoints
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "recipe.yaml").write_text("{}\n")
    (tmp_path / "scratch" / "step_00000001").mkdir(parents=True)
    (linked / "checkpoints").symlink_to(tmp_path / "scratch")
    assert main([str(run), "--out", str(linked / "checkpoints" / "step_00000001")]) == 2
    assert "inside a run's checkpoints" in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path))  # "~/r" quoted: the shell left it to us
    assert main(["~/r", "--out", "~/elsewhere"]) == 0
    assert (tmp_path / "elsewhere" / "model.safetensors").is_file()


def test_a_checkpoint_rotated_away_during_an_export_is_not_exported_half(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exporting a run still training (keep_last 1): rotation deleted the checkpoint between
    the export's reads, which then wrote manifest_sha256 null or failed with "no DeepSpeed
    model states".  The newest checkpoint is taken again; a named one is said to be gone."""
    import json

    import mmssl.train.export as export

    _train(synthetic_recipe(tmp_path, "r", 3))
    run = tmp_path / "r"
    real = export._read_state

    def rotating(ckpt_dir: Path, tag: str):  # the run deletes the checkpoint mid-read
        if tag == "step_00000003":
            shutil.rmtree(ckpt_dir / tag)
            raise FileNotFoundError(f"{ckpt_dir / tag}: no DeepSpeed model states")
        return real(ckpt_dir, tag)

    monkeypatch.setattr(export, "_read_state", rotating)
    out = export_run(run, tmp_path / "exp")
    source = json.loads((out / "exported_from.json").read_text())
    assert source["checkpoint"] == "step_00000002" and len(source["manifest_sha256"]) == 64
    # rotation deletes the manifest first: a checked tag without one is gone (it was
    # exported with manifest_sha256 null)
    (run / "checkpoints" / "step_00000002" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="removed while it was being exported"):
        export_run(run, tmp_path / "exp3", tag="step_00000002", verified=True)
    (run / "checkpoints" / "step_00000002").rename(run / "checkpoints" / "step_00000003")
    with pytest.raises(FileNotFoundError, match="removed while it was being exported"):
        export_run(run, tmp_path / "exp2", tag="step_00000003", verified=True)
