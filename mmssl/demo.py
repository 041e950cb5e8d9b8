"""`mmssl demo`: the end-to-end demo in one go, on a laptop CPU.

1. demo data (coloured digits with captions, Python help texts)  -> OUT/data
2. quickstart pretraining through DeepSpeed (recipes/quickstart.yaml) -> OUT/runs/quickstart
3. export of the last checkpoint                                  -> OUT/runs/quickstart/export
4. zero-shot digit and colour classification on the held-out test split
5. a 10-shot probe (logistic regression, prototypes, kNN) on frozen features
6. LM perplexity next to a unigram model of the same corpus, and generated samples

Prints a table, writes OUT/summary.md, OUT/demo_results.json and the plots of every step.
A second run reuses the data and the finished training run (pass --fresh to start over).
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from mmssl.cliargs import ArgumentParser, summary
from mmssl.shipped import shipped_path

TARGETS = {"zeroshot_digit": 0.80, "fewshot10_logistic": 0.85}
RECIPE = shipped_path("recipes", "quickstart.yaml")
DATA_PREFIX = "data/demo/"


def recipe_overrides(recipe: Path, data_dir: Path, out: Path, steps: int | None) -> list[str]:
    """Point the recipe's demo-data sources at data_dir and its runs at out/runs."""
    from mmssl.train.recipe import read_yaml

    raw = read_yaml(recipe)
    overrides = [f"out_dir={out / 'runs'}"]
    for name, src in (raw.get("data", {}).get("sources") or {}).items():
        urls = str(src.get("urls", ""))
        if urls.startswith(DATA_PREFIX):
            overrides.append(f"data.sources.{name}.urls={data_dir / urls[len(DATA_PREFIX) :]}")
    if steps is not None:
        warmup = int((raw.get("schedule") or {}).get("warmup_steps", 0))
        overrides += [f"train.steps={steps}", f"schedule.warmup_steps={min(warmup, steps // 10)}"]
        every = int((raw.get("checkpoint") or {}).get("every", 0))
        if every > steps:
            overrides.append(f"checkpoint.every={steps}")
        eval_every = int((raw.get("eval") or {}).get("every", 0))
        if eval_every > steps:
            overrides.append(f"eval.every={steps}")
    return overrides


def _stage(name: str, timings: dict[str, float], start: float) -> None:
    timings[name] = round(time.perf_counter() - start, 1)
    print(f"[demo] {name} done in {timings[name]:.1f} s", flush=True)


class _Stopped(Exception):
    """The pretraining stopped on SIGTERM (`mmssl.train.preempt`), its checkpoint saved."""


def run_demo(
    out: Path, steps: int | None = None, fresh: bool = False, recipe: Path = RECIPE
) -> dict[str, Any]:
    """Run every stage; returns the numbers of the final table."""
    from mmssl.data.demo import write_demo
    from mmssl.data.errors import DataError
    from mmssl.eval.cli import run_task
    from mmssl.eval.features import extract_features
    from mmssl.eval.features_file import features_metadata, save_features
    from mmssl.eval.loading import EvalError, export_run, load_model
    from mmssl.train import preempt
    from mmssl.train.cli import main as train_main

    timings: dict[str, float] = {}
    data = out / "data"
    run_dir = out / "runs" / "quickstart"
    if fresh and run_dir.is_dir():
        from mmssl.train.run_lock import RunDirLock

        lock = RunDirLock(run_dir)  # a demo still training there: refused, not deleted
        lock.acquire()
        lock.release()
        shutil.rmtree(run_dir, ignore_errors=True)
    t = time.perf_counter()
    if not (data / "demo.json").is_file():
        write_demo(str(data))
    try:
        info = json.loads((data / "demo.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:  # damaged by hand or by a crash while writing it
        raise DataError(
            f"{data / 'demo.json'} is unreadable ({err}); delete {data} to write the data again"
        ) from None
    _stage("data", timings, t)

    t = time.perf_counter()
    argv = [str(recipe), *recipe_overrides(recipe, data, out, steps), "logging.progress=true"]
    print("[demo] mmssl train " + shlex.join(argv), flush=True)  # pastes into a shell
    code = train_main(argv)
    if code == preempt.EXIT_CODE:  # the run saved a checkpoint and stopped: not a failure
        raise _Stopped(
            f"[demo] stopped by SIGTERM after saving a checkpoint in {run_dir / 'checkpoints'};"
            " the same `mmssl demo` command continues the training from it"
        )
    if code != 0:
        hint = ""
        if (run_dir / "checkpoints").is_dir():  # e.g. an earlier demo with another --steps
            hint = f"; pass --fresh to start {run_dir} over"
        raise EvalError(f"pretraining failed (see the error above){hint}")
    _stage("pretraining", timings, t)

    t = time.perf_counter()
    model_dir = export_run(run_dir)
    loaded = load_model(model_dir)
    _stage("export", timings, t)

    t = time.perf_counter()
    from mmssl.eval.data import shard_urls

    digits = data / "digits"
    ev = out / "eval"
    feats = {}
    for split in ("train", "test"):
        pattern = str(digits / info["digits"][split]["pattern"])
        f = extract_features(
            loaded.model, shard_urls(pattern), loaded.preprocess, fields=("digit", "color")
        )
        feats[split] = str(ev / f"features_{split}.safetensors")
        # with the vision weights' sha256 and the preprocessing, as `mmssl features` writes
        # them: the tasks below check the file against --model
        save_features(feats[split], f, features_metadata(loaded, pattern, ("digit", "color")))
    _stage("features", timings, t)

    t = time.perf_counter()
    common = ["--model", str(model_dir)]
    zs = {
        field: run_task(
            [
                "zeroshot",
                *common,
                "--data",
                feats["test"],
                "--classes",
                field,
                "--out",
                str(ev / f"zeroshot_{field}"),
            ]
        )
        for field in ("digit", "color")
    }
    _stage("zero-shot", timings, t)

    t = time.perf_counter()
    fs = run_task(
        [
            "fewshot",
            *common,
            "--train",
            feats["train"],
            "--test",
            feats["test"],
            "--label-field",
            "digit",
            "--shots",
            "1,2,4,10,16",
            "--seeds",
            "5",
            "--out",
            str(ev / "fewshot_digit"),
        ]
    )
    _stage("few-shot", timings, t)

    t = time.perf_counter()
    text = data / "text"
    lm = run_task(
        [
            "lm",
            *common,
            "--data",
            str(text / info["text"]["validation"]["pattern"]),
            "--train-data",
            str(text / info["text"]["train"]["pattern"]),
            "--task",
            "demo",
            "--shots",
            "0,5",
            "--prompt",
            "a red",
            "--prompt",
            "The for statement",
            "--out",
            str(ev / "lm"),
        ]
    )
    _stage("LM", timings, t)

    results = {
        "zeroshot_digit": zs["digit"]["top1"],
        "zeroshot_color": zs["color"]["top1"],
        "fewshot10_logistic": fs["logistic"][10]["mean"],
        "fewshot10_prototype": fs["prototype"][10]["mean"],
        "fewshot10_knn": fs["knn"][10]["mean"],
        "lm_perplexity": lm["perplexity"],
        "lm_unigram_perplexity": lm["unigram_perplexity"],
        "lm_demo_task_acc_0shot": lm["multiple_choice"]["demo"]["0"]["acc"],
        "lm_demo_task_acc_5shot": lm["multiple_choice"]["demo"]["5"]["acc"],
        # the prompts of 5 examples that the LM's context cut (it sees fewer examples)
        "lm_demo_task_cut_5shot": lm["multiple_choice"]["demo"]["5"]["prompts_cut"],
        "lm_demo_task_items": lm["multiple_choice"]["demo"]["5"]["num_items"],
        "samples": lm["samples"],
        "timings_s": timings,
        "model": str(model_dir),
    }
    return results


def table(r: dict[str, Any]) -> str:
    """The final table as markdown (also readable as plain text)."""

    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    rows = [
        (
            "zero-shot digit top-1 (test, chance 0.10)",
            f"{r['zeroshot_digit']:.3f}",
            f">= {TARGETS['zeroshot_digit']:.2f} {mark(r['zeroshot_digit'] >= TARGETS['zeroshot_digit'])}",
        ),
        ("zero-shot colour top-1 (test, chance 0.125)", f"{r['zeroshot_color']:.3f}", ""),
        (
            "10-shot logistic probe, digit (5 draws)",
            f"{r['fewshot10_logistic']:.3f}",
            f">= {TARGETS['fewshot10_logistic']:.2f} {mark(r['fewshot10_logistic'] >= TARGETS['fewshot10_logistic'])}",
        ),
        ("10-shot nearest prototype, digit", f"{r['fewshot10_prototype']:.3f}", ""),
        ("10-shot kNN, digit", f"{r['fewshot10_knn']:.3f}", ""),
        (
            "LM validation perplexity",
            f"{r['lm_perplexity']:.2f}",
            f"< unigram {r['lm_unigram_perplexity']:.2f} {mark(r['lm_perplexity'] < r['lm_unigram_perplexity'])}",
        ),
        (
            "LM demo task accuracy, 0-shot / 5-shot (chance 0.5)",
            f"{r['lm_demo_task_acc_0shot']:.3f} / {r['lm_demo_task_acc_5shot']:.3f}",
            f"5-shot prompts cut to the context: {r['lm_demo_task_cut_5shot']} of "
            f"{r['lm_demo_task_items']}",
        ),
    ]
    lines = ["| result | value | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def targets_met(r: dict[str, Any]) -> bool:
    """Whether the demo results `r` meet TARGETS (zero-shot digit and 10-shot logistic accuracy)
    and the LM beats its unigram baseline's perplexity."""
    return (
        r["zeroshot_digit"] >= TARGETS["zeroshot_digit"]
        and r["fewshot10_logistic"] >= TARGETS["fewshot10_logistic"]
        and r["lm_perplexity"] < r["lm_unigram_perplexity"]
    )


def write_summary(out: Path, r: dict[str, Any], wall: float) -> None:
    """Write OUT/summary.md (results table, timings, samples, plots) and OUT/demo_results.json."""
    plots = [
        "runs/quickstart/loss.png",
        "eval/zeroshot_digit/confusion.png",
        "eval/zeroshot_color/confusion.png",
        "eval/fewshot_digit/fewshot.png",
    ]
    lines = [
        "# mmssl demo",
        "",
        table(r),
        "",
        f"Wall time {wall:.0f} s; stages (s): {json.dumps(r['timings_s'])}",
        "",
    ]
    lines += ["Samples:", ""] + [f"- `{s!r}`" for s in r["samples"]] + [""]
    lines += [f"![{Path(p).parent.name}]({p})" for p in plots if (out / p).is_file()]
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "demo_results.json").write_text(
        json.dumps(dict(r, wall_s=round(wall, 1)), indent=2) + "\n", encoding="utf-8"
    )


def output_problem(out: Path) -> str | None:
    """Why the demo cannot write into `out` (None if it can): OUT and each directory the demo
    writes into must be a directory or not exist yet."""
    for path in (out, out / "data", out / "runs", out / "runs" / "quickstart", out / "eval"):
        if path.exists() and not path.is_dir():
            return f"{path} exists and is not a directory"
    return None


def main(argv: list[str] | None = None) -> int:
    """`mmssl demo`: exit code 0; 1 with --check when a target is missed; 2 on bad input."""
    parser = ArgumentParser(prog="mmssl demo", description=summary(__doc__))
    parser.add_argument("--out", default="demo", help="output directory (default ./demo)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="override the recipe's train.steps (a quicker, weaker demo)",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="delete an earlier training run in OUT first"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    from mmssl.data.errors import DataError
    from mmssl.eval.loading import EvalError

    if args.steps is not None and args.steps < 1:
        print(f"mmssl demo: error: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    from mmssl.schema import ConfigError

    out = Path(args.out)
    try:
        problem = output_problem(out)
    except OSError as err:  # a name too long, a symlink loop: exists() raises
        problem = f"{out}: {err.strerror or err}"
    if problem:  # before anything is written, not a traceback from deep in the data writer
        print(f"mmssl demo: error: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        r = run_demo(out, args.steps, args.fresh)
    except (EvalError, DataError, ConfigError, OSError) as err:  # a read-only or full disk too
        print(f"mmssl demo: error: {err}", file=sys.stderr)
        return 2
    except _Stopped as stop:
        from mmssl.train.preempt import EXIT_CODE

        print(stop, flush=True)
        return EXIT_CODE
    wall = time.perf_counter() - start
    write_summary(out, r, wall)
    print()
    print(table(r))
    print()
    for s in r["samples"]:
        print(f"sample: {s!r}")
    print(
        f"\nwall time {wall:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in r['timings_s'].items())})"
    )
    print(f"summary and plots: {out / 'summary.md'}")
    return 1 if args.check and not targets_met(r) else 0


if __name__ == "__main__":
    from mmssl.cliargs import tolerant_streams

    tolerant_streams()
    sys.exit(main())
