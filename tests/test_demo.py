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


@pytest.mark.parametrize("kind", ["loop", "long"])
def test_an_output_path_the_os_cannot_resolve_is_one_line(tmp_path: Path, kind: str, capsys):
    """A symlink loop or a name past NAME_MAX raised OSError out of Path.exists(): a
    traceback and exit 1."""
    if kind == "loop":
        (tmp_path / "a").symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(tmp_path / "a")
        out = tmp_path / "a"
    else:
        out = tmp_path / ("x" * 300)
    assert main(["--out", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mmssl demo: error: ") and str(out) in err[0], err


def test_fresh_refuses_to_delete_a_run_that_is_still_training(tmp_path: Path, capsys):
    """--fresh deleted the run directory before training took its lock: a second demo
    removed a live run's checkpoints and lock."""
    import subprocess
    import sys

    run_dir = tmp_path / "out" / "runs" / "quickstart"
    (run_dir / "checkpoints").mkdir(parents=True)
    holder = subprocess.Popen(  # another process holds the run's lock, as a training run does
        [sys.executable, "-c", (
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(run_dir / '.mmssl-run.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n"
        )],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(["--out", str(tmp_path / "out"), "--steps", "1", "--fresh"]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert "is in use by another run" in err, err
    assert (run_dir / "checkpoints").is_dir()  # kept
