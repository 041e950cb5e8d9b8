"""SIGTERM, as a cluster scheduler sends it before it kills a pre-empted job (to every process
of the job: ranks and their loader workers), stops a 2-rank run at the next checked step after
saving that step's checkpoint: every rank exits 143 there, and the resumed run ends bitwise
equal to an uninterrupted one (fp32, CPU), having consumed every sample key exactly as often.
Without the handler (`checkpoint.sigterm_check_every=0`) SIGTERM kills at once, as before."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from fault_helpers import Launch, bitwise_equal, exported, key_counts, key_log, tiny_run, wait_gone
from train_helpers import losses

from mmssl.train.checkpoint import newest_valid, tag_of

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, CHECK, SIGNALLED = 6, 2, 3  # the signal comes at the end of step 3, checked at step 4
COMMON = [
    f"train.steps={STEPS}",
    "checkpoint.every=0",  # no checkpoint but the run's end: the one at step 4 is the signal's
    f"checkpoint.sigterm_check_every={CHECK}",
    "data.workers=1",  # signalled too: step 4 needs its batch from them
    "model.overrides.vision.block.drop_path=0.1",  # per-rank RNG streams must resume too
]


def _signalled_run(demo: str, tmp: Path, name: str, *extra: str) -> Launch:
    """A launch of run `name` paused at the end of step 3 and sent SIGTERM, to the whole group."""
    launch = Launch(
        [
            {
                "args": tiny_run(demo, str(tmp), name, *COMMON, *extra),
                "env": {"MMSSL_FAULTS": f"pause@step_end:{SIGNALLED}"},
            }
        ],
        tmp / f"launch-{name}",
    )
    launch.wait_paused(tmp / name, "step_end")
    os.killpg(launch.pgid, signal.SIGTERM)
    return launch


def test_sigterm_saves_the_step_it_stops_at_and_the_resume_is_exact(
    demo_data: str, tmp_path: Path
) -> None:
    reference = Launch(
        [{"args": tiny_run(demo_data, str(tmp_path), "reference", *COMMON)}], tmp_path / "ref"
    )
    assert [r["code"] for rank in reference.wait() for r in rank] == [0, 0]

    run = tmp_path / "faulted"
    stopped = _signalled_run(demo_data, tmp_path, "faulted")
    records = stopped.wait()
    assert [r["code"] for rank in records for r in rank] == [143, 143], stopped.tail()
    assert newest_valid(run / "checkpoints", "test", collective=False) == tag_of(4)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [tag_of(4)]
    assert [s for s, _ in key_log(run, 0)] == [1, 2, 3, 4]
    summary = (run / "summary.md").read_text()
    assert f"SIGTERM at step 4: saved {run / 'checkpoints' / tag_of(4)}" in summary
    assert "- steps: 0 -> 4 of 6" in summary
    assert "rerun the same command with checkpoint.resume=auto" in summary
    assert "fix the cause" not in summary
    said = f"mmssl train: {run.name}: SIGTERM at step 4"
    assert said in stopped.logs[0].read_text() and said not in stopped.logs[1].read_text()

    resumed = Launch(
        [{"args": tiny_run(demo_data, str(tmp_path), "faulted", *COMMON)}], tmp_path / "resume"
    )
    assert [r["code"] for rank in resumed.wait() for r in rank] == [0, 0]
    ref = tmp_path / "reference"
    for rank in range(2):
        a, b = key_log(run, rank), key_log(ref, rank)
        assert [s for s, _ in a] == list(range(1, STEPS + 1))
        assert a == b, f"rank {rank}: the key sequence differs from the uninterrupted run"
        assert key_counts(a) == key_counts(b)
    assert losses(run) == losses(ref)
    assert bitwise_equal(exported(run), exported(ref)), "weights differ from the reference"


def test_without_the_handler_sigterm_kills_at_once(demo_data: str, tmp_path: Path) -> None:
    launch = _signalled_run(demo_data, tmp_path, "plain", "checkpoint.sigterm_check_every=0")
    for p in launch.procs:
        p.wait(timeout=60)
    assert [p.returncode for p in launch.procs] == [-signal.SIGTERM] * 2
    assert wait_gone(launch.pgid) == []
    assert not (tmp_path / "plain" / "checkpoints").exists() or not list(
        (tmp_path / "plain" / "checkpoints").glob("step_*")
    )
    assert not (tmp_path / "launch-plain" / "results").exists()  # no rank got to its record
