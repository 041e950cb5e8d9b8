"""Kill and resume: a 2-rank run is SIGKILLed between steps, in the middle of a step and
during a checkpoint save, resumed each time with `checkpoint.resume=auto`, and must end
bitwise equal to an uninterrupted run (fp32, CPU) having consumed every sample key exactly
as often.  A checkpoint whose save was cut short is never picked up."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest
from fault_helpers import (
    FULL,
    Launch,
    bitwise_equal,
    exported,
    key_counts,
    key_log,
    tiny_run,
    wait_gone,
)
from train_helpers import losses

from mmssl.train.checkpoint import MANIFEST, newest_valid, tag_of

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, EVERY = 8, 2
COMMON = [
    f"train.steps={STEPS}",
    f"checkpoint.every={EVERY}",
    "checkpoint.keep_last=2",
    "data.workers=1",  # loader workers: their positions must resume exactly too
    "model.overrides.vision.block.drop_path=0.1",  # per-rank RNG streams must resume too
]
# (pause point, step): a step that is not a checkpoint step ends; forward and backward are
# done but not the update; DeepSpeed wrote the checkpoint files, the manifest is not written
CHAIN = [("step_end", 3), ("mid_step", 5), ("save", 6)]


def _good_before(point: str, step: int) -> int:
    """The checkpoint a resume must start from after a kill at (point, step)."""
    done = step if point == "step_end" else step - 1
    return done - done % EVERY


def _kill_at(
    demo: str, tmp: Path, name: str, point: str, step: int, attempt: int, before: tuple = ()
) -> None:
    """Run (after the runs `before`, which finish), pause at (point, step), SIGKILL all."""
    run_dir = tmp / name
    faulted = {
        "args": tiny_run(demo, str(tmp), name, *COMMON),
        "env": {"MMSSL_FAULTS": f"pause@{point}:{step}"},
    }
    launch = Launch(
        [*({"args": tiny_run(demo, str(tmp), b, *COMMON)} for b in before), faulted],
        tmp / f"launch{attempt}",
    )
    launch.wait_paused(run_dir, point)
    ckpt = run_dir / "checkpoints"
    if point == "save":
        # DeepSpeed's `latest` still names the last complete checkpoint (its zero_to_fp32.py
        # reads it): written after the manifest, which is not there yet
        was = _good_before(point, step)
        latest = ckpt / "latest"
        assert latest.read_text().strip() == tag_of(was) if was else not latest.exists()
        assert not (ckpt / tag_of(step) / MANIFEST).exists()
    launch.kill()
    assert wait_gone(launch.pgid) == [], "processes survived SIGKILL"
    shutil.rmtree(run_dir / ".faults")
    good = _good_before(point, step)
    assert newest_valid(ckpt, "test", collective=False) == (tag_of(good) if good else None)


def _random_kill(demo: str, tmp: Path, name: str, attempt: int, rng: random.Random) -> bool:
    """SIGKILL at a random moment after start-up; returns False if the run finished first."""
    launch = Launch([{"args": tiny_run(demo, str(tmp), name, *COMMON)}], tmp / f"launch{attempt}")
    log = tmp / name / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and log.stat().st_size) and time.monotonic() < deadline:
        if any(p.poll() is not None for p in launch.procs):
            break
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 2.0))
    finished = all(p.poll() is not None for p in launch.procs)
    launch.kill()
    assert wait_gone(launch.pgid) == []
    return not finished


def _check_same_as_reference(tmp: Path, name: str) -> None:
    faulted, ref = tmp / name, tmp / "reference"
    for rank in range(2):
        a, b = key_log(faulted, rank), key_log(ref, rank)
        assert [s for s, _ in a] == list(range(1, STEPS + 1))
        assert a == b, f"rank {rank}: the key sequence differs from the uninterrupted run"
        assert key_counts(a) == key_counts(b)  # every key consumed exactly as often
    assert losses(faulted) == losses(ref)
    assert bitwise_equal(exported(faulted), exported(ref)), "weights differ from the reference"


def _random_chain(demo: str, tmp: Path, name: str, rng: random.Random, attempt: int) -> int:
    """Pauses at random points and steps, then SIGKILLs at random moments (inside file
    writes, collectives, loader start-up...); returns the next attempt number."""
    for _ in range(3):
        point, step = rng.choice(["step_end", "mid_step", "save"]), rng.randint(1, STEPS)
        if point == "save" and step % EVERY:
            step += 1
        prev = newest_valid(tmp / name / "checkpoints", "test", collective=False)
        if step > STEPS or (point == "step_end" and step == STEPS):
            continue
        if prev and int(prev[5:]) >= step:
            continue  # that point is behind the run already
        _kill_at(demo, tmp, name, point, step, attempt)
        attempt += 1
    for _ in range(4):
        attempt += 1
        if not _random_kill(demo, tmp, name, attempt - 1, rng):
            break
    return attempt


def test_kill_between_mid_step_and_during_save_then_resume(demo_data: str, tmp_path: Path) -> None:
    """CI: one chain of the three kill points.  MMSSL_FAULTS_FULL=1 adds three chains of
    random pauses and SIGKILLs at random moments."""
    for attempt, (point, step) in enumerate(CHAIN):
        # the uninterrupted reference runs to its end first, in the first launch
        before = ("reference",) if attempt == 0 else ()
        _kill_at(demo_data, tmp_path, "faulted", point, step, attempt, before)
    names = ["faulted"]
    rng, attempt = random.Random(10), len(CHAIN)
    for chain in range(3 if FULL else 0):
        names.append(f"chain{chain}")
        attempt = _random_chain(demo_data, tmp_path, names[-1], rng, attempt)
    final = Launch(
        [{"args": tiny_run(demo_data, str(tmp_path), name, *COMMON)} for name in names],
        tmp_path / "final",
    )
    records = final.wait()
    assert all(r["code"] == 0 for rank in records for r in rank)
    log0 = final.logs[0].read_text()
    # the interrupted save was named and passed over
    assert f"skipping checkpoint {tmp_path / 'faulted' / 'checkpoints' / tag_of(6)}" in log0
    assert "no manifest.json" in log0
    assert "- steps: 4 -> 8 of 8" in (tmp_path / "faulted" / "summary.md").read_text()
    for name in names:
        _check_same_as_reference(tmp_path, name)
