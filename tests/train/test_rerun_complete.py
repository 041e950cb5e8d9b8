"""A finished run run again has nothing to do: it says so and leaves the run directory, its
summary.md above all, as the run that trained it wrote it."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import synthetic_recipe

pytestmark = pytest.mark.usefixtures("one_process_group")


def _files(run: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stop_at", [None, 1])
def test_a_finished_run_run_again_keeps_its_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stop_at: int | None
) -> None:
    """`mmssl train r.yaml` twice: the second wrote a no-op summary.md ("steps: 2 -> 2",
    "throughput: 0.0 samples/s") over the real one."""
    from mmssl.train.cli import main

    extra = {} if stop_at is None else {"stop_at": stop_at}
    args = [str(synthetic_recipe(tmp_path, "done", 2, **extra))]
    assert main(args) == 0
    run = tmp_path / "done"
    before = _files(run)
    end = stop_at or 2
    assert f"- steps: 0 -> {end} of 2" in (run / "summary.md").read_text()
    capsys.readouterr()
    assert main(args) == 0
    assert _files(run) == before  # summary.md, metrics, plot and checkpoints as they were
    out = capsys.readouterr().out
    assert f"mmssl train: done: already complete at step {end} of 2" in out, out
    assert "nothing to do" in out and "samples/s" not in out, out


def test_a_run_killed_before_its_summary_writes_it_when_run_again(tmp_path: Path) -> None:
    """Killed between its last checkpoint and its summary (here: the summary removed, or
    older than that checkpoint): running it again said "already complete" and never wrote
    summary.md or loss.png."""
    import os

    from mmssl.train.cli import main

    args = [str(synthetic_recipe(tmp_path, "cut", 2))]
    assert main(args) == 0
    run = tmp_path / "cut"
    (run / "summary.md").unlink()
    (run / "loss.png").unlink(missing_ok=True)
    assert main(args) == 0
    assert "- steps: 2 -> 2 of 2" in (run / "summary.md").read_text()
    stale = run / "summary.md"  # a summary from before the last checkpoint: an earlier attempt's
    os.utime(stale, ns=(0, 0))
    assert main(args) == 0
    assert stale.stat().st_mtime_ns > 0  # written again
