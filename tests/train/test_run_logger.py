"""RunLogger: throughput leaves out evaluation and checkpoint time, `time` goes on across a
resume, and an error flushes TensorBoard (hand-computed values, a fake clock)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmssl.train import logging as run_logging
from mmssl.train.logging import METRICS, RunLogger


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(run_logging.time, "perf_counter", c)
    return c


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS).read_text().splitlines()]


def test_throughput_leaves_out_excluded_time(tmp_path: Path, clock: Clock) -> None:
    log = RunLogger(tmp_path, True, 10, 0, 8, False, False)
    clock.now += 3.0
    log.log(2, {"loss": 1.0}, 0.1)  # the first interval (start-up): not in the mean
    clock.now += 2.0  # 2 s of steps
    log.exclude(1.5)  # an evaluation
    clock.now += 1.5
    log.log(4, {"loss": 1.0}, 0.1)
    clock.now += 0.5  # a checkpoint save after the log point, counted in the next interval
    log.exclude(0.5)
    clock.now += 4.0  # 4 s of steps
    log.log(6, {"loss": 1.0}, 0.1)
    rates = [r["samples_per_s"] for r in _rows(tmp_path)]
    assert rates == [round(16 / 3.0, 2), 16 / 2.0, 16 / 4.0]
    assert log.samples_per_s == pytest.approx((8.0 + 4.0) / 2)
    # wall time keeps everything
    assert [r["time"] for r in _rows(tmp_path)] == [3.0, 6.5, 11.0]


def test_a_run_stopped_before_its_first_log_point_has_a_throughput(
    tmp_path: Path, clock: Clock
) -> None:
    """5 steps, then SIGTERM before logging.every's first point: summary.md said 0.0
    samples/s.  Without two log intervals it is every step done over the time not excluded."""
    log = RunLogger(tmp_path, True, 40, 0, 8, False, False)
    for _ in range(5):
        clock.now += 2.0
        log.advance()
    log.exclude(3.0)  # the checkpoint save of the stop
    clock.now += 3.0
    assert log.samples_per_s == pytest.approx(5 * 8 / 10.0)


def test_time_goes_on_across_a_resume(tmp_path: Path, clock: Clock) -> None:
    log = RunLogger(tmp_path, True, 10, 0, 8, False, False)
    for step in (2, 4):
        clock.now += 5.0
        log.log(step, {"loss": 1.0}, 0.1)
    clock.now += 1000.0  # the run stopped; resumed later from step 2's checkpoint
    log = RunLogger(tmp_path, True, 10, 2, 8, False, False)
    clock.now += 7.0
    log.log(4, {"loss": 1.0}, 0.1)
    assert [(r["step"], r["time"]) for r in _rows(tmp_path)] == [(2, 5.0), (4, 12.0)]


def test_abort_flushes_tensorboard(tmp_path: Path) -> None:
    """The points logged before an error (a NaN stop) reach the event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLogger(tmp_path, True, 10, 0, 8, True, False)
    for step in (1, 2, 3):
        log.log(step, {"loss": float(step)}, 0.1)
    log.abort()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("loss")] == [1.0, 2.0, 3.0]


def test_a_resume_killed_while_it_trims_the_metrics_keeps_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows past the resumed step are dropped by writing the kept ones aside and renaming
    that over the file; a kill before the rename (here: the rename fails) leaves every row,
    where truncating in place first left an empty file."""
    import os

    (tmp_path / METRICS).write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    before = (tmp_path / METRICS).read_bytes()

    def killed(*args: object) -> None:
        raise KeyboardInterrupt  # SIGINT; a SIGKILL there leaves the same files

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        RunLogger(tmp_path, True, 10, 1, 8, False, False)
    assert (tmp_path / METRICS).read_bytes() == before
    monkeypatch.undo()
    RunLogger(tmp_path, True, 10, 1, 8, False, False)
    assert _rows(tmp_path) == [{"step": 1}]
