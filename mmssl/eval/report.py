"""Evaluation outputs: results.json (model, data, command, versions), summary.md and plots.

Plots use matplotlib's Agg backend, so they render without a display.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import Tensor

from mmssl.atomic import FileLock, replace_together
from mmssl.train.run_lock import is_run_dir

RESULTS = "results.json"
SUMMARY = "summary.md"

# the files of its own that a task writes before its report (a rerun after a failure
# between the two replaces them), and every name an eval writes into its --out
TASK_FILES = {
    "zeroshot": ("confusion.png",),
    "fewshot": ("fewshot.png",),
    "finetune": ("finetuned.safetensors",),
}
OUTPUTS = (RESULTS, SUMMARY, *(name for names in TASK_FILES.values() for name in names))


def report_task(out_dir: str | Path) -> str | None:
    """The task whose report is in `out_dir`: the `task` of its results.json when that is one
    `write_report` wrote (a JSON object with `task` and `results`), else None."""
    try:
        doc = json.loads((Path(out_dir) / RESULTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, unreadable, not JSON or not UTF-8
        return None
    if isinstance(doc, dict) and isinstance(doc.get("task"), str) and "results" in doc:
        return doc["task"]
    return None


def _names(entries: Sequence[Path], most: int = 4) -> str:
    names = sorted(e.name + ("/" if e.is_dir() else "") for e in entries)
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def out_dir_problem(out_dir: str | Path, task: str) -> str | None:
    """Why the report of `task` must not be written to directory `out_dir`, or None.

    Like `mmssl features`, which replaces only a features file it wrote, an eval replaces
    only its own files: those of an earlier run of the same task (its results.json names the
    task, or the files of its own a run of it wrote before failing: `TASK_FILES`).
    Refused: a training run directory, the report of another task (its plots would stay
    next to this one's results) and a file named like an eval output (`OUTPUTS`) that no run
    of this task wrote, such as a summary.md of the user's.  Files of other names are
    no obstacle (`--out .` beside the class file and the shards): an eval never touches them.
    """
    out = Path(out_dir)
    if not out.exists():
        return None
    if not out.is_dir():
        return "exists and is not a directory"
    try:
        entries = list(out.iterdir())
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if is_run_dir(out):
        return f"is a training run directory ({_names(entries)})"
    earlier = report_task(out)
    if earlier == task:
        return None  # a rerun replaces its own output
    if earlier is not None:
        return f"holds the results of eval {earlier} ({_names(entries)})"
    own = TASK_FILES.get(task, ())
    foreign = [e for e in entries if e.name in OUTPUTS and e.name not in own]
    if foreign:
        return f"holds files an eval writes that no eval {task} wrote ({_names(foreign)})"
    return None


def versions() -> dict[str, str]:
    """Versions of python and the libraries a result depends on (without importing them)."""
    out = {"python": platform.python_version()}
    for dist in ("mmssl", "torch", "deepspeed", "numpy", "scikit-learn", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _clean(obj: Any) -> Any:
    """JSON-safe copy: tensors to lists, NaN to None, tuple to list, Path to str."""
    if isinstance(obj, Tensor):
        return _clean(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 4 significant decimals."""

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    task: str,
    results: dict[str, Any],
    *,
    model: str,
    data: Any,
    command: Sequence[str] | None = None,
    summary: str = "",
    plots: Sequence[str] = (),
    checkpoint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write OUT/results.json and OUT/summary.md; returns the results.json content.
    checkpoint: the training checkpoint the model was exported from (`Loaded.checkpoint`).

    EvalError when OUT holds a results.json or summary.md that is not an earlier report
    of `task` (the plots a task wrote before its report are its own): `mmssl eval` refuses
    such an --out before any work (`out_dir_problem`), this keeps any other caller from
    replacing a run's summary.md or another task's results."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # two evaluations sharing an --out take turns: its results.json and summary.md are
    # always one report's (they were each half of two, or a cut file)
    with FileLock(out / ".mmssl-eval.lock"):
        return _write_report(out, task, results, model, data, command, summary, plots, checkpoint)


def _write_report(
    out: Path,
    task: str,
    results: dict[str, Any],
    model: str,
    data: Any,
    command: Sequence[str] | None,
    summary: str,
    plots: Sequence[str],
    checkpoint: dict[str, Any] | None,
) -> dict[str, Any]:
    """`write_report`, holding the --out's lock."""
    earlier = report_task(out)
    if earlier != task and ((out / RESULTS).exists() or (out / SUMMARY).exists()):
        what = f"the results of eval {earlier}" if earlier else f"a {RESULTS} or {SUMMARY}"
        from mmssl.eval.loading import EvalError

        raise EvalError(f"{out} holds {what} that eval {task} did not write; not overwriting it")
    doc = {
        "task": task,
        "model": model,
        **({"checkpoint": checkpoint} if checkpoint else {}),
        "data": data,
        "command": list(command) if command is not None else ["mmssl", *sys.argv[1:]],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "results": results,
        "plots": list(plots),
    }
    doc = _clean(doc)
    lines = [f"# {task}", "", f"- model: `{model}`", f"- data: `{json.dumps(_clean(data))}`"]
    # quoted as a shell reads it: a brace pattern pasted bare expands into extra arguments
    lines += [f"- command: `{shlex.join(doc['command'])}`", ""]
    if summary:
        lines += [summary, ""]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    text = "\n".join(lines).rstrip() + "\n"
    # one report's pair: each file whole (a cut results.json named no task and blocked the
    # rerun) and the summary last, so a kill leaves the new results.json without a summary,
    # never beside the old one (the rerun takes its results.json for its own)
    replace_together(
        [
            (out / RESULTS, json.dumps(doc, indent=2) + "\n"),
            (out / SUMMARY, text),
        ]
    )
    return doc


def _save(fig: Any, path: str | Path) -> None:
    """savefig through a temporary file: a kill left a cut PNG beside the report."""
    kind = Path(path).suffix.lstrip(".") or "png"
    replace_together([(Path(path), lambda tmp: fig.savefig(tmp, dpi=100, format=kind))])


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: Tensor, classnames: Sequence[str], path: str | Path, title: str) -> str:
    """Row-normalised confusion matrix (rows = true class) as a PNG; returns the path."""
    plt = _pyplot()
    counts = cm.double()
    norm = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = len(classnames)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classnames, rotation=45, ha="right")
    ax.set_yticks(range(n), classnames)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if counts[i, j] > 0:
                    color = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(
                        j, i, int(counts[i, j]), ha="center", va="center", fontsize=7, color=color
                    )
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return str(path)


def plot_fewshot(
    curves: dict[str, dict[int, tuple[float, float]]], path: str | Path, title: str
) -> str:
    """Accuracy against shots per class, one line per method with a +-std band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.set_xscale("log", base=2)
    for name, points in curves.items():
        ks = sorted(points)
        mean = [points[k][0] for k in ks]
        std = [points[k][1] for k in ks]
        ax.plot(ks, mean, marker="o", label=name)
        ax.fill_between(
            ks, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2
        )
        ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return str(path)
