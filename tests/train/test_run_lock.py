"""One run at a time in a run directory (mmssl/train/run_lock.py): a second launch into a
live run's directory resumed from its checkpoints, deleted them in rotation and interleaved
metrics.jsonl; it is now refused before it reads or writes anything there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from distributed_utils import run_distributed
from train_helpers import synthetic_recipe

from mmssl.train.run_lock import LOCK_NAME

# another process's hold of the lock, as a run takes it (a POSIX record lock)
HOLD = (
    "import fcntl, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
    "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
)
TRY = (
    "import fcntl, os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "try:\n"
    "    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "    print('free')\n"
    "except OSError:\n"
    "    print('held')\n"
)


def _holder(lock: Path) -> subprocess.Popen:
    other = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert other.stdout is not None and other.stdout.readline() == "held\n"
    return other


@pytest.mark.usefixtures("one_process_group")
def test_a_run_into_a_directory_another_process_is_using_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mmssl.train.cli import main

    args = [str(synthetic_recipe(tmp_path, "busy", 2))]
    run = tmp_path / "busy"
    run.mkdir()
    other = _holder(run / LOCK_NAME)
    try:
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


@pytest.mark.usefixtures("one_process_group")
def test_the_lock_is_released_when_the_run_returns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another process can take it once the run has returned (runs one after another in one
    process, a sweep or a resume test, take it in turn)."""
    from mmssl.train.cli import main

    args = [str(synthetic_recipe(tmp_path, "seq", 2))]
    assert main(args) == 0
    lock = tmp_path / "seq" / LOCK_NAME
    done = subprocess.run([sys.executable, "-c", TRY, str(lock)], capture_output=True, text=True)
    assert done.stdout.strip() == "free", done.stderr
    assert main(args) == 0  # run again: it takes the lock to find the run complete
    assert "already complete" in capsys.readouterr().out


@pytest.mark.usefixtures("one_process_group")
def test_a_refused_resume_into_a_new_run_directory_leaves_none(tmp_path: Path) -> None:
    """The lock makes the run directory; a run refused before it wrote anything there
    leaves the file system as it was."""
    from mmssl.train.cli import main

    assert main([str(synthetic_recipe(tmp_path, "a", 1))]) == 0
    step = tmp_path / "a" / "checkpoints" / "step_00000001"
    args = [str(synthetic_recipe(tmp_path, "b", 2)), f"checkpoint.resume={step}"]
    assert main([*args, "optim.lr=0.5"]) == 2  # another run's checkpoint, another lr
    assert not (tmp_path / "b").exists()


def _refused_job(recipe: str) -> int:
    """On each rank: a run into the directory another process holds."""
    from mmssl.train.cli import main

    return main([recipe])


@pytest.mark.distributed
@pytest.mark.slow
def test_every_rank_is_refused_when_rank_0_finds_the_directory_in_use(tmp_path: Path) -> None:
    recipe = synthetic_recipe(tmp_path, "busy2", 2, world_size=2)
    run = tmp_path / "busy2"
    run.mkdir()
    other = _holder(run / LOCK_NAME)
    try:
        codes = run_distributed(_refused_job, 2, str(recipe), timeout=300)
    finally:
        other.kill()
        other.wait()
    assert codes == [2, 2]  # none waits in a collective the others never enter
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
