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


@pytest.mark.parametrize("left", ["none", "failed", "earlier stop"])
def test_a_run_killed_before_its_summary_writes_it_when_run_again(
    tmp_path: Path, left: str
) -> None:
    """Killed between its last checkpoint and its summary, a run is left with no summary.md,
    a failed attempt's or an earlier stop's: running it again said "already complete" and
    kept that (or none) for good."""
    from mmssl.train.cli import main

    args = [str(synthetic_recipe(tmp_path, "cut", 2))]
    assert main(args) == 0
    summary = tmp_path / "cut" / "summary.md"
    if left == "none":
        summary.unlink()
    elif left == "failed":
        summary.write_text("# Run summary: cut (failed)\n\n- steps: 0 -> 2 of 2\n")
    else:
        summary.write_text(summary.read_text().replace("0 -> 2 of 2", "0 -> 1 of 2"))
    assert main(args) == 0
    text = summary.read_text()
    assert text.startswith("# Run summary: cut\n") and "- steps: 2 -> 2 of 2" in text


def test_a_finished_run_is_complete_whatever_its_files_times(tmp_path: Path) -> None:
    """A copied or restored run whose checkpoint is newer than its summary is still complete
    (an mtime rule rewrote its summary as a no-op one)."""
    import os

    from mmssl.train.cli import main

    args = [str(synthetic_recipe(tmp_path, "t", 2))]
    assert main(args) == 0
    run = tmp_path / "t"
    os.utime(run / "summary.md", ns=(0, 0))
    before = _files(run)
    assert main(args) == 0
    assert _files(run) == before


def test_a_run_resumed_from_another_runs_checkpoint_runs_again_cleanly(tmp_path: Path) -> None:
    """Its checkpoint is not under its own run directory (an mtime rule looked there and
    failed with FileNotFoundError on the second run)."""
    from mmssl.train.cli import main

    assert main([str(synthetic_recipe(tmp_path, "a", 2))]) == 0
    other = tmp_path / "a" / "checkpoints" / "step_00000002"
    args = [str(synthetic_recipe(tmp_path, "b", 2)), f"checkpoint.resume={other}"]
    assert main(args) == 0
    assert main(args) == 0
