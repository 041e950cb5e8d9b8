"""export_run: a failed re-export leaves no exported_from.json naming another checkpoint;
a checkpoint replaced while it was read is refused; training-time switches are not exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import synthetic_recipe

from mmssl.train.export import CheckpointRotated, export_run

pytestmark = pytest.mark.usefixtures("one_process_group")


def _train(path: Path) -> None:
    from mmssl.train.loop import train
    from mmssl.train.recipe import load_recipe, validate

    recipe = load_recipe(str(path), [])
    train(recipe, validate(recipe))


def test_export_gaps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mmssl.train.export as export

    _train(synthetic_recipe(tmp_path, "r", 1))
    run = tmp_path / "r"
    tag = "step_00000001"
    out = export_run(run, tmp_path / "exp")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    # E9: a training-time switch, not part of the export
    assert config["model"]["vision"]["grad_checkpointing"] is False
    assert config["model"]["text"]["grad_checkpointing"] is False
    assert (out / "exported_from.json").is_file()

    # E5: a second export that fails while saving leaves no exported_from.json naming a
    # checkpoint the folder's weights may not be from
    def broken(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr("mmssl.models.io.save_pretrained", broken)
        with pytest.raises(OSError, match="disk full"):
            export_run(run, out)
    assert not (out / "exported_from.json").exists()

    # E4: the checkpoint replaced (its manifest rewritten) while it was read
    real = export._read_record
    folder = run / "checkpoints" / tag

    def replacing(f: Path):
        got = real(f)
        manifest = folder / "manifest.json"
        manifest.write_text(manifest.read_text(encoding="utf-8") + " ", encoding="utf-8")
        return got

    monkeypatch.setattr(export, "_read_record", replacing)
    with pytest.raises(CheckpointRotated, match="removed while it was being exported"):
        export_run(run, tmp_path / "exp2", tag=tag, verified=True)


def test_an_export_over_another_runs_export_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`mmssl export B --out DIR` replaced run A's export in DIR without a word (a re-export
    of the same run, a newer checkpoint, is the usual case and stays quiet)."""
    import logging

    for name in ("a", "b"):
        _train(synthetic_recipe(tmp_path, name, 1))
    out = tmp_path / "exp"
    export_run(tmp_path / "a", out)
    assert json.loads((out / "exported_from.json").read_text())["run"] == str(tmp_path / "a")
    with caplog.at_level(logging.WARNING, logger="mmssl.train"):
        export_run(tmp_path / "a", out)
        assert "another run" not in caplog.text
        export_run(tmp_path / "b", out)
    assert f"{out} held the export of another run ({tmp_path / 'a'}), now {tmp_path / 'b'}'s" in (
        caplog.text
    )


def test_an_export_that_cannot_write_its_weights_is_one_line(tmp_path: Path) -> None:
    """Under a file size limit (a full disk alike) `mmssl export` ended in safetensors' own
    traceback (exit 1); the export already there must stay loadable."""
    import resource
    import subprocess
    import sys

    import mmssl

    _train(synthetic_recipe(tmp_path, "r", 2))
    out = export_run(tmp_path / "r", tmp_path / "exp", tag="step_00000001")
    size = (out / "model.safetensors").stat().st_size
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    code = "import sys; from mmssl.train.export import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, str(tmp_path / "r"), "--out", str(out)]
    res = subprocess.run(argv, capture_output=True, text=True, preexec_fn=limited, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "File too large" in res.stderr
    assert "model.safetensors" in res.stderr and "nothing replaced" in res.stderr
    # step 2's export failed: step 1's files as they were (its record of them gone)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == {k: v for k, v in before.items() if k != "exported_from.json"}
    assert mmssl.load_encoder(out, tower="model") is not None
