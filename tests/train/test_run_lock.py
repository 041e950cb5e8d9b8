"""One run at a time in a run directory (mmssl/train/run_lock.py): a second launch into a
live run's directory resumed from its checkpoints, deleted them in rotation and interleaved
metrics.jsonl; it is now refused before it reads or writes anything there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import synthetic_recipe

from mmssl.train.run_lock import LOCK_NAME

pytestmark = pytest.mark.usefixtures("one_process_group")

HOLD = (
    "import fcntl, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
)


def test_a_run_into_a_directory_another_process_is_using_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mmssl.train.cli import main

    args = [str(synthetic_recipe(tmp_path, "busy", 2))]
    run = tmp_path / "busy"
    run.mkdir()
    other = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run / LOCK_NAME)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdout.readline() == "held\n"
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"run directory {run} is in use by another run" in err
        assert "Traceback" not in err and err.count("error") == 1
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing read or written
    finally:
        other.kill()  # as a SIGKILLed run: the kernel drops its lock
        other.wait()
    assert main(args) == 0
    assert "- steps: 0 -> 2 of 2" in (run / "summary.md").read_text()
    assert (run / LOCK_NAME).read_bytes() == b""  # never written: a rerun changes no file


def test_the_lock_is_released_when_the_run_returns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs one after another in one process (a sweep, a resume test) take it in turn."""
    from mmssl.train.cli import main
    from mmssl.train.run_lock import RunDirLock

    args = [str(synthetic_recipe(tmp_path, "seq", 2))]
    assert main(args) == 0
    assert main(args) == 0  # run again: it takes the lock to find the run complete
    assert "already complete" in capsys.readouterr().out
    lock = RunDirLock(tmp_path / "seq")
    lock.acquire()  # free again
    lock.release()
