"""`mmssl eval TASK ...` (also `python -m mmssl.eval TASK ...`).

Tasks: zeroshot, retrieval, fewshot, linear, finetune, lm, sensitivity.  Every task takes
`--model`, an exported model directory or a training run directory (its latest checkpoint
is exported on the fly), and writes results.json, summary.md and its plots to `--out`,
replacing an earlier report of the same task there; a training run directory, another
task's report or a file named like an eval output that this task did not write are
refused before any work (`mmssl.eval.report.out_dir_problem`); other files are left alone.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmssl.cliargs import ArgumentParser, check_numbers, summary
from mmssl.eval.loading import EvalError, Loaded

# task -> (module with add_arguments(parser) and run(args, ctx), one-line help)
TASKS: dict[str, tuple[str, str]] = {
    "zeroshot": ("mmssl.eval.zeroshot", "zero-shot classification from class names and templates"),
    "retrieval": ("mmssl.eval.retrieval", "image<->text recall@1/5/10 on image-text shards"),
    "fewshot": ("mmssl.eval.fewshot", "k-shot logistic / prototype / kNN probes over seeds"),
    "linear": ("mmssl.eval.linear", "linear probe with a weight-decay sweep on a validation split"),
    "finetune": (
        "mmssl.eval.finetune",
        "fine-tune the vision tower with a new head (DeepSpeed AdamW, warmup + cosine, "
        "no augmentation)",
    ),
    "lm": ("mmssl.eval.lm", "perplexity, multiple-choice scoring and samples of the text tower"),
    "sensitivity": (
        "mmssl.eval.sensitivity",
        "omega-usage loss rises under descriptor shuffling, centred cosines per augmentation",
    ),
}


class Context:
    """What a task gets besides its arguments: the model (loaded once) and the report writer."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args = args
        self.argv = argv
        self._loaded: Loaded | None = None

    def load(self) -> Loaded:
        """The model of --model, loaded (and exported from a run) on first use."""
        if self._loaded is None:
            from mmssl.eval.loading import load_model

            self._loaded = load_model(self.args.model)
        return self._loaded

    def report(
        self,
        task: str,
        results: dict[str, Any],
        *,
        data: Any,
        summary: str = "",
        plots: list[str] | None = None,
    ) -> dict[str, Any]:
        """Write the task's results.json and summary.md to --out (see `write_report`); returns the
        results.json content."""
        from mmssl.eval.report import write_report

        model = str(self._loaded.model_dir) if self._loaded is not None else self.args.model
        notes = []
        if self._loaded is not None and str(self._loaded.model_dir) != self.args.model:
            notes.append(f"exported to {self._loaded.model_dir}")
        checkpoint = self._loaded.checkpoint() if self._loaded is not None else None
        if checkpoint:  # which step was scored: a run dir's export follows the run
            notes.append(f"checkpoint {checkpoint['tag']}")
        if notes:
            model = f"{self.args.model} ({', '.join(notes)})"
        return write_report(
            self.args.out,
            task,
            results,
            model=model,
            data=data,
            command=["mmssl", "eval", *self.argv],
            summary=summary,
            plots=plots or [],
            checkpoint=checkpoint,
        )


def build_parser() -> argparse.ArgumentParser:
    """The `mmssl eval` parser: one subcommand per task, with the common options."""
    parser = ArgumentParser(prog="mmssl eval", description=summary(__doc__))
    sub = parser.add_subparsers(dest="command", metavar="TASK")
    for name, (module, help_) in TASKS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--model", required=True, help="exported model dir or training run dir")
        p.add_argument(
            "--out",
            default=None,
            help="output directory; may hold an earlier report of this task, which is replaced, "
            "and files of other names (default: eval-TASK)",
        )
        p.add_argument(
            "--tokenizer",
            default=None,
            help="tokenizer to use instead of the checkpoint's (checked against it)",
        )
        # lm's rows are whole contexts (1024 tokens x the vocabulary's logits for gpt_124m)
        batch = 32 if name == "lm" else 256
        rows = f"rows per forward (default {batch})"
        if name == "sensitivity":  # the batch is the contrastive problem, not only memory
            rows += "; also the contrastive batch of the loss rise, so it changes the figure"
        p.add_argument("--batch-size", type=int, default=batch, help=rows)
        p.add_argument(
            "--limit", type=int, default=None, help="only the first N samples of each split"
        )
        importlib.import_module(module).add_arguments(p)
    return parser


# the numeric options of every task, checked before anything is loaded or written
# (temperature 0 is greedy decoding for lm; kNN needs it > 0 and the logistic probe a weight
# decay > 0, which fewshot checks)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "limit": (lambda v: v >= 1, ">= 1"),
    "seeds": (lambda v: v >= 1, ">= 1"),
    "knn_k": (lambda v: v >= 1, ">= 1"),
    "steps": (lambda v: v >= 1, ">= 1"),
    "train_batch_size": (lambda v: v >= 1, ">= 1"),
    "num_classes": (lambda v: v >= 1, ">= 1"),
    # a sample is printed: 1e12 tokens allocated 8 TB after the scores were computed
    "max_new_tokens": (lambda v: 0 <= v <= 100_000, "in 0..100000"),
    "top_k": (lambda v: v >= 0, ">= 0 (0: no top-k cut)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "stride": (lambda v: v >= 1, ">= 1"),
    "seed": (lambda v: v >= 0, ">= 0"),
    "lr": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "layer_decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "temperature": (lambda v: v >= 0, ">= 0"),
    "val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
}


def run_task(argv: list[str]) -> dict[str, Any]:
    """Parse and run one task; raises EvalError / DataError on bad input (for callers in Python).
    A task that fails before writing anything leaves no output directory behind."""
    args = build_parser().parse_args(argv)
    if args.command is None:
        raise EvalError("no task given; choose from " + ", ".join(TASKS))
    if args.out is None:
        args.out = f"eval-{args.command}"
    problem = check_numbers(args, RULES)
    if problem:
        raise EvalError(problem)
    out = Path(args.out)
    from mmssl.eval.report import out_dir_problem

    # never over a training run's summary.md, another task's results or someone's files
    problem = out_dir_problem(out, args.command)
    if problem:
        raise EvalError(f"--out {out} {problem}; use another --out")
    made = missing_dirs(out)
    try:
        resolved(out).mkdir(parents=True, exist_ok=True)  # the directories `made` lists
    except OSError as err:  # a file in the way above it, a read-only directory, ...
        remove_empty_dirs(made)
        raise EvalError(f"--out {out}: cannot make the directory ({err})") from None
    # the tasks write where that directory is: `sub/../new` as written goes through `sub`
    args.out = str(resolved(out))
    module = importlib.import_module(TASKS[args.command][0])
    try:
        return module.run(args, Context(args, argv))
    except BaseException:
        # a task that failed before writing anything leaves none of the directories it made
        # behind (one that wrote partial results, as sensitivity does, keeps them)
        remove_empty_dirs(made)
        raise


def resolved(path: str | Path) -> Path:
    """`path` with its symlinks and `..` resolved as the file system resolves them:
    `sub/../new` is `new` (mkdir of the path as written would make `sub` too)."""
    return Path(os.path.realpath(path))


def missing_dirs(path: Path) -> list[Path]:
    """`resolved(path)` and those of its parents that do not exist yet, deepest first: the
    directories that `resolved(path).mkdir(parents=True)` makes."""
    missing = []
    here = resolved(path)
    while not os.path.lexists(here):  # lexists: a dangling symlink is not made
        missing.append(here)
        here = here.parent
    return missing


def remove_empty_dirs(made: list[Path]) -> None:
    """Remove the directories of `made` (deepest first) while they are empty; stop at the
    first that holds something, whose parents then hold it too."""
    for d in made:
        try:
            d.rmdir()
        except FileNotFoundError:  # never made (mkdir failed below it)
            continue
        except OSError:  # not empty (partial results), or not ours to remove
            break


def main(argv: list[str] | None = None) -> int:
    """`mmssl eval TASK ...`: prints the task's summary.md; exit code 0, or 2 on bad input."""
    from mmssl.data.errors import DataError

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # a missing task is a mistake (usage on stderr, 2); --help is not
        build_parser().print_usage(sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    if argv[0] not in TASKS and not argv[0].startswith("-"):
        # one line with the close task, as `mmssl` does for a command (argparse lists choices)
        close = difflib.get_close_matches(argv[0], TASKS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        print(
            f"mmssl eval: error: unknown task {argv[0]!r}; {hint}choose from {', '.join(TASKS)}",
            file=sys.stderr,
        )
        return 2
    try:
        run_task(argv)
    except (EvalError, DataError, FileNotFoundError) as err:
        print(f"mmssl eval: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno != errno.ENAMETOOLONG:  # the disk, not the arguments
            raise
        print(f"mmssl eval: error: {err}", file=sys.stderr)
        return 2
    # the summary run_task wrote: `--out ""` is the current directory there, not eval-TASK
    # (whose summary of an earlier run was printed)
    out = build_parser().parse_args(argv).out
    out = resolved(f"eval-{argv[0]}" if out is None else out)
    print((out / "summary.md").read_text(encoding="utf-8").rstrip())
    return 0
