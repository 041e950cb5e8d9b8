"""Run logging on rank 0: metrics.jsonl, TensorBoard, a tqdm bar with samples/s, and at the
end `summary.md` with the loss curves (`loss.png`), throughput and skipped-sample counts.
A run that an error ends gets `write_error_summary` instead, from each rank that caught it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; a line cut short by a kill (or a crash of the machine
    mid-append) is dropped, so that the resume rewrites the file without it."""
    path = run_dir / METRICS
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


class RunLogger:
    """Writes only when `enabled` (rank 0).  `start_step` > 0 on resume: later lines of an
    earlier attempt are dropped so the curve has one value per step, and `time` goes on from
    the last kept line's.

    `samples_per_s` is training throughput: time the loop reports with `exclude` (evaluation,
    checkpoint saves) is left out of it, though not out of the wall-clock `time` column."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        total_steps: int,
        start_step: int,
        samples_per_step: int,
        tensorboard: bool,
        progress: bool,
    ) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self.samples_per_step = samples_per_step
        self.start_step = start_step
        self.t0 = self.t_last = self.t_begin = time.perf_counter()
        self.step_last = start_step
        self.excluded = 0.0  # seconds of this interval that were not training
        self.excluded_all, self.steps_done = 0.0, 0  # this attempt's, for `samples_per_s`
        self.rates: list[float] = []
        self.tb: Any = None
        self.bar: Any = None
        if not enabled:
            return
        kept = [m for m in read_metrics(run_dir) if m["step"] <= start_step]
        # into a temporary file, then renamed: a resume killed here (a pre-empted job dies
        # again as it restarts) keeps the run's history, which truncating in place lost
        from mmssl.atomic import write_atomic

        write_atomic(run_dir / METRICS, "".join(json.dumps(m) + "\n" for m in kept))
        last_time = kept[-1].get("time") if kept else None
        if isinstance(last_time, (int, float)):
            self.t0 -= last_time
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc=run_dir.name,
                unit="step",
                dynamic_ncols=True,
            )

    def log(self, step: int, metrics: dict[str, float], lr: float) -> None:
        """One log point: the averages of `metrics` since the last one."""
        now = time.perf_counter()
        busy = now - self.t_last - self.excluded
        rate = (step - self.step_last) * self.samples_per_step / max(busy, 1e-9)
        self.excluded = 0.0
        # the first interval holds start-up (compilation, worker spawn): kept out of the mean
        if self.step_last > self.start_step:
            self.rates.append(rate)
        self.t_last, self.step_last = now, step
        if not self.enabled:
            return
        row = {
            "step": step,
            "samples": step * self.samples_per_step,
            "lr": lr,
            "samples_per_s": round(rate, 2),
            "time": round(now - self.t0, 3),
            **metrics,
        }
        with open(self.run_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step":
                    self.tb.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{metrics.get('loss', float('nan')):.4f}", samples_s=f"{rate:.1f}"
            )

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (evaluation, a checkpoint save) out of this interval's throughput."""
        self.excluded += seconds
        self.excluded_all += seconds

    def advance(self, steps: int = 1) -> None:
        """`steps` more steps done: the progress bar moves on."""
        self.steps_done += steps
        if self.bar is not None:
            self.bar.update(steps)

    @property
    def samples_per_s(self) -> float:
        """Mean throughput over the log intervals after the first one; without two, over every
        step done (a run stopped before its first log point said 0.0)."""
        if self.rates:
            return sum(self.rates) / len(self.rates)
        elapsed = time.perf_counter() - self.t_begin - self.excluded_all
        return self.steps_done * self.samples_per_step / max(elapsed, 1e-9)

    def abort(self) -> None:
        """On an error: close the bar and flush TensorBoard (its last points, often the ones
        that show what went wrong, would otherwise be lost at exit); no summary."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def close(self, info: dict[str, Any], skipped: dict[str, int]) -> None:
        """At the end of a run (rank 0): close the bar and TensorBoard, plot loss.png and write
        summary.md; other ranks do nothing."""
        if not self.enabled:
            return
        self.abort()
        rows = read_metrics(self.run_dir)
        plot_losses(rows, self.run_dir / "loss.png")
        write_summary(self.run_dir, rows, {**info, "samples_per_s": self.samples_per_s}, skipped)
        # the other ranks' summaries of an earlier failed attempt no longer describe the run
        for stale in self.run_dir.glob("summary.rank*.md"):
            stale.unlink(missing_ok=True)


def plot_losses(rows: list[dict[str, Any]], out: Path) -> None:
    """Total and per-objective loss against step, one PNG (matplotlib Agg, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    keys = [k for k in (rows[0] if rows else {}) if k == "loss" or k.startswith("loss/")]
    for key in keys:
        ax.plot(
            [r["step"] for r in rows],
            [r[key] for r in rows],
            label=key,
            linewidth=2 if key == "loss" else 1,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    if keys:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def write_summary(
    run_dir: Path, rows: list[dict[str, Any]], info: dict[str, Any], skipped: dict[str, int]
) -> None:
    """Write RUN_DIR/summary.md: `info`, throughput, skip counts, the first and last logged loss
    metrics, and the loss plot."""
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    lines = [f"# Run summary: {run_dir.name}", ""]
    lines += [f"- {k}: {v}" for k, v in info.items() if k != "samples_per_s"]
    lines += [
        f"- throughput: {info['samples_per_s']:.1f} samples/s",
        f"- skipped bad samples: {sum(skipped.values())}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))})" if skipped else ""),
        "",
        "| metric | first logged | last logged |",
        "|---|---|---|",
    ]
    shown = ("loss", "logit_scale", "logit_bias")
    for key in (k for k in last if k.split("/")[0] in shown):
        lines.append(f"| {key} | {first.get(key, float('nan')):.4f} | {last[key]:.4f} |")
    lines += ["", "![loss curve](loss.png)", ""]
    (run_dir / "summary.md").write_text("\n".join(lines), encoding="utf-8")


def error_summary_name(rank: int) -> str:
    """The summary file of a failed run written by `rank`: rank 0's is the run's summary.md."""
    return "summary.md" if rank == 0 else f"summary.rank{rank}.md"


def write_error_summary(
    run_dir: Path,
    rank: int,
    info: dict[str, Any],
    skipped: dict[str, int],
    error: BaseException,
    next_step: str,
) -> Path:
    """The summary of a run that `error` ended, as this rank saw it (nothing gathered from
    the other ranks: `skipped` is this rank's); rank 0 also plots loss.png from the metrics
    it logged.  Returns the file written."""
    message = str(error)
    reason = f"{type(error).__name__}: {message}" if message else type(error).__name__
    lines = [f"# Run summary: {run_dir.name} (failed)", ""]
    lines += [f"- error: {reason.splitlines()[0] if reason else reason}"]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [
        f"- rank: {rank}"
        + (
            " (written by this rank alone: other ranks may have written summary.rank<R>.md)"
            if info.get("world_size", 1) != 1
            else ""
        ),
        f"- skipped bad samples on this rank: {sum(skipped.values())}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))})" if skipped else ""),
        "",
        "## What next",
        "",
        next_step[:1].upper() + next_step[1:] + ".",
        "",
        "## Error",
        "",
        "```",
        reason,
        "```",
        "",
    ]
    if rank == 0:
        rows = read_metrics(run_dir)
        if rows:
            last = rows[-1]
            lines += [f"Last logged (step {last['step']}):", ""]
            lines += ["| metric | first logged | last logged |", "|---|---|---|"]
            shown = ("loss", "logit_scale", "logit_bias")
            for key in (k for k in last if k.split("/")[0] in shown):
                lines.append(f"| {key} | {rows[0].get(key, float('nan')):.4f} | {last[key]:.4f} |")
            plot_losses(rows, run_dir / "loss.png")
            lines += ["", "![loss curve](loss.png)", ""]
    path = run_dir / error_summary_name(rank)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
