"""Soak: a 2-rank run with checkpoints, eval hooks, a loader worker per source and one
injected rank-local NaN step.  Resident memory of each rank is read from /proc during the
run: it must not grow by 10% or more after warm-up.  Once training returns, each rank holds
the same file descriptors as before the run (after a short first run in the same process)
and no child process; once the launch ends, no process of it is left.  CI runs ~a minute; MMSSL_FAULTS_FULL=1 runs five times longer."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pytest
from fault_helpers import FULL, Launch, rss_kib, tiny_run, wait_gone

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 1000 if FULL else 150


def _step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def test_soak_two_ranks(demo_data: str, tmp_path: Path) -> None:
    args = tiny_run(
        demo_data,
        str(tmp_path),
        "soak",
        f"train.steps={STEPS}",
        "checkpoint.every=25",
        "checkpoint.keep_last=2",
        "eval.every=25",
        "eval.batches=1",
        "logging.every=5",
        "logging.keys=false",
        "data.workers=1",
    )
    # a 2-step run first opens what a process opens once (font cache, loader machinery), so
    # that descriptors held after the soak run are what that run itself left behind
    warm = tiny_run(
        demo_data,
        str(tmp_path),
        "warm",
        "train.steps=2",
        "checkpoint.every=1",
        "eval.every=1",
        "eval.batches=1",
        "data.workers=1",
    )
    launch = Launch([{"args": warm}, {"args": args}], tmp_path / "launch", faults="nan_loss@7:r1")
    run_dir = tmp_path / "soak"
    samples: list[tuple[int, list[int]]] = []  # (step, RSS KiB of each rank)
    t0 = time.monotonic()
    while all(p.poll() is None for p in launch.procs):
        try:
            samples.append((_step(run_dir), [rss_kib(p.pid) for p in launch.procs]))
        except OSError:
            break
        if time.monotonic() - t0 > 1800:
            launch.kill()
            pytest.fail("soak did not finish in 30 minutes")
        time.sleep(0.1)  # a fast run has ~10 s after warm-up; 0.5 s gave 19 samples
    records = launch.wait(timeout=120)
    assert wait_gone(launch.pgid) == [], "processes of the run are left"

    # memory after warm-up (first checkpoint and eval done) against the end of the run
    warm = [rss for step, rss in samples if STEPS * 0.2 <= step < STEPS]
    assert len(warm) >= 20, f"too few samples after warm-up: {len(samples)}"
    for rank in range(2):
        start = statistics.median(r[rank] for r in warm[:10])
        end = statistics.median(r[rank] for r in warm[-10:])
        print(
            f"rank {rank}: RSS {start / 1024:.0f} MiB after warm-up, {end / 1024:.0f} MiB at the end"
        )
        assert end < 1.10 * start, f"rank {rank}: RSS grew from {start} to {end} KiB"

    for rank, rank_records in enumerate(records):
        rec = rank_records[1]
        assert rank_records[0]["code"] == 0
        assert rec["code"] == 0
        assert rec["children"] == [], f"rank {rank} left child processes {rec['children']}"
        leaked = sorted(set(rec["fds_after"]) - set(rec["fds_before"]))
        assert rec["fds_after"] == rec["fds_before"], f"rank {rank} leaked fds: {leaked}"
    summary = (run_dir / "summary.md").read_text()
    assert f"- steps: 0 -> {STEPS} of {STEPS}" in summary and "- bad_steps: 1" in summary
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval/loss" in r for r in rows) == STEPS // 25
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        f"step_{STEPS - 25:08d}",
        f"step_{STEPS:08d}",
    ]
