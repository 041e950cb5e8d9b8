"""`mmssl demo` into an output path it cannot use: one line and exit 2, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmssl.demo import main


@pytest.mark.parametrize("blocked", ["", "data", "runs/quickstart", "eval"])
def test_demo_refuses_an_output_path_that_is_a_file(tmp_path: Path, blocked: str, capsys):
    out = tmp_path / "out"
    file = out / blocked if blocked else out
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("keep\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["--out", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"mmssl demo: error: {file} exists and is not a directory"], err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # untouched
    assert file.read_text() == "keep\n"


def test_a_pretraining_stopped_by_sigterm_stops_the_demo_as_such(
    tmp_path: Path, demo_data: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """SIGTERM makes `mmssl train` save and exit 143 (tests/faults/test_sigterm.py); the demo
    took that for a failure ("pretraining failed", exit 2).  It stops with 143 and says the
    same command continues, exporting and evaluating nothing."""
    import mmssl.train.cli

    monkeypatch.setattr(mmssl.train.cli, "main", lambda argv: 143)
    out = tmp_path / "out"
    out.mkdir()
    (out / "data").symlink_to(demo_data)  # the session's demo data: nothing to write
    assert main(["--out", str(out), "--steps", "1"]) == 143
    said = capsys.readouterr()
    assert "[demo] stopped by SIGTERM after saving a checkpoint" in said.out
    assert "the same `mmssl demo` command continues" in said.out and not said.err
    assert sorted(p.name for p in out.iterdir()) == ["data"]  # no export, no eval
