"""`mmssl eval` as a command: a mistyped task, and which summary it prints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mmssl.eval.cli import TASKS, main


@pytest.mark.parametrize("task, hint", [("zerosht", "did you mean 'zeroshot'? "), ("xyz", "")])
def test_an_unknown_task_is_one_line_with_the_close_one(
    task: str, hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([task, "--model", "M"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"mmssl eval: error: unknown task {task!r}; {hint}choose from {', '.join(TASKS)}\n"
    )


def test_no_task_is_an_error_with_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: mmssl eval")
    assert main(["--help"]) == 0 and "zeroshot" in capsys.readouterr().out


def test_the_printed_summary_is_the_one_just_written(
    tmp_path: Path, tiny_model_dir: str, test_shards: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--out ""` writes to the current directory; the summary of an earlier run in
    # eval-retrieval/ was printed instead
    stale = tmp_path / "eval-retrieval"
    stale.mkdir()
    (stale / "summary.md").write_text("an earlier run\n")
    args = ["retrieval", "--model", tiny_model_dir, "--data", test_shards, "--out", ""]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(args) == 0
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["task"] == "retrieval"
    assert out.strip() == (tmp_path / "summary.md").read_text().strip()
    assert "an earlier run" not in out


@pytest.mark.parametrize("task", ["fewshot", "lm"])
def test_a_repeated_shot_count_is_refused(
    task: str, tmp_path: Path, tiny_model_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--shots 1,2,1` overwrote the first 1-shot result and printed its column twice
    data = ["--train", "T", "--test", "T"] if task == "fewshot" else []
    out = tmp_path / "out"
    argv = [task, "--model", tiny_model_dir, *data, "--shots", "1,2,1", "--out", str(out)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "mmssl eval: error: --shots repeats 1 (in '1,2,1')\n"
    assert not out.exists()


@pytest.mark.parametrize(
    "task, option, value, says",
    [
        ("fewshot", "--methods", "knn,prototype,knn", "--methods repeats knn"),
        # two spellings of one decay: the second was fit and silently dropped from val_top1
        ("linear", "--decays", "1e-3,0.01,0.001", "--decays repeats 0.001"),
    ],
)
def test_a_repeated_method_or_decay_is_refused(
    task: str,
    option: str,
    value: str,
    says: str,
    tmp_path: Path,
    tiny_model_dir: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `--methods knn,knn` printed the knn row twice; `--decays` kept one of two equal decays
    out = tmp_path / "out"
    argv = [task, "--model", tiny_model_dir, "--train", "T", "--test", "T", option, value]
    assert main([*argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"mmssl eval: error: {says} (in {value!r})\n"
    assert not out.exists()


@pytest.mark.parametrize(
    "task, option, what",
    [
        ("fewshot", "--shots", "integers"),
        ("fewshot", "--methods", "method names"),
        ("linear", "--decays", "numbers"),
        ("lm", "--shots", "integers"),
    ],
)
def test_an_empty_list_option_is_refused(
    task: str,
    option: str,
    what: str,
    tmp_path: Path,
    tiny_model_dir: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `fewshot --shots ''` and `--methods ''` exited 0 with empty results, while
    # `linear --decays ''` was refused: every list option is now refused alike
    data = ["--train", "T", "--test", "T"] if task != "lm" else []
    out = tmp_path / "out"
    argv = [task, "--model", tiny_model_dir, *data, option, "", "--out", str(out)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"mmssl eval: error: {option} is empty (got ''): give one or more comma-separated {what}\n"
    )
    assert not out.exists()


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmssl eval: error: "), captured.err
    return lines[0]


def test_eval_out_holding_a_training_run_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--out RUN_DIR` replaced the run's summary.md with the eval's
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "summary.md").write_text("the training summary\n")
    (run / "recipe.yaml").write_text("model: {}\n")
    before = sorted(p.name for p in run.iterdir())
    # a model that does not exist: the --out check comes first, before anything is loaded
    argv = ["zeroshot", "--model", str(tmp_path / "nomodel"), "--data", "D", "--classes", "color"]
    assert main([*argv, "--out", str(run)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"mmssl eval: error: --out {run} ") and "another --out" in line
    assert "training run" in line and "checkpoints" in line
    assert (run / "summary.md").read_text() == "the training summary\n"
    assert sorted(p.name for p in run.iterdir()) == before


def test_eval_out_holding_a_file_named_like_an_eval_output_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.md").write_text("mine\n")
    (out / "notes.txt").write_text("mine\n")
    argv = ["retrieval", "--model", str(tmp_path / "nomodel"), "--data", "D", "--out", str(out)]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"mmssl eval: error: --out {out} ") and "summary.md" in line
    assert "another --out" in line and "notes.txt" not in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "summary.md"]
    assert (out / "summary.md").read_text() == "mine\n"


def test_eval_out_beside_other_files_writes_its_report_and_leaves_them(
    tmp_path: Path, tiny_model_dir: str, test_shards: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--out .` beside the class file or a features file: an eval never touches those."""
    (tmp_path / "classes.json").write_text("{}\n")
    argv = ["retrieval", "--model", tiny_model_dir, "--data", test_shards, "--out", str(tmp_path)]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "classes.json").read_text() == "{}\n"
    assert (tmp_path / "results.json").is_file() and (tmp_path / "summary.md").is_file()


def test_eval_out_of_another_task_is_refused_and_the_same_task_replaces_its_own(
    tmp_path: Path, tiny_model_dir: str, test_shards: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # zeroshot then retrieval into one --out left retrieval's results.json next to zeroshot's
    # confusion.png, and zeroshot's results were gone
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine
    zeroshot = [
        "zeroshot",
        "--model",
        tiny_model_dir,
        "--data",
        test_shards,
        "--classes",
        "color",
        "--label-field",
        "label",
        "--out",
        str(out),
    ]
    assert main(zeroshot) == 0
    capsys.readouterr()
    written = json.loads((out / "results.json").read_text())
    assert written["task"] == "zeroshot" and (out / "confusion.png").exists()
    summary_md = (out / "summary.md").read_text()
    retrieval = ["retrieval", "--model", tiny_model_dir, "--data", test_shards, "--out", str(out)]
    assert main(retrieval) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"mmssl eval: error: --out {out} ") and "another --out" in line
    assert "zeroshot" in line and "results.json" in line
    assert json.loads((out / "results.json").read_text()) == written
    assert (out / "summary.md").read_text() == summary_md
    # the same task again replaces its own earlier output, as users expect
    assert main([*zeroshot, "--limit", "6"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["task"] == "zeroshot" and again["time"] >= written["time"]
    assert "--limit" in again["command"]


@pytest.mark.parametrize("depth", [1, 3])
def test_a_failed_eval_removes_every_directory_it_made(
    depth: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--out newparent/a/b` with a model that does not exist left newparent/a behind
    keep = tmp_path / "existing"
    keep.mkdir()
    out = keep.joinpath(*[f"new{i}" for i in range(depth)])
    argv = ["zeroshot", "--model", str(tmp_path / "nomodel"), "--data", "D", "--classes", "color"]
    assert main([*argv, "--out", str(out)]) == 2
    _one_error_line(capsys)
    assert keep.is_dir() and list(keep.iterdir()) == []  # only what the command made is gone


@pytest.mark.parametrize(
    "task, option",
    [("zeroshot", "--data"), ("retrieval", "--data"), ("fewshot", "--train"), ("lm", "--data")],
)
def test_an_unbalanced_brace_pattern_is_one_line_naming_it(
    task: str,
    option: str,
    tmp_path: Path,
    tiny_model_dir: str,
    test_shards: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # braceexpand's UnbalancedBracesError was a traceback (exit 1)
    bad = str(Path(test_shards).parent / "test-{000000..000003.tar")
    extra = {
        "zeroshot": ["--classes", "color", "--label-field", "label"],
        "fewshot": ["--test", test_shards, "--shots", "1"],
    }.get(task, [])
    out = tmp_path / "out"
    assert main([task, "--model", tiny_model_dir, option, bad, *extra, "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert repr(bad) in line and "brace" in line.lower(), line
    assert not out.exists()


def test_eval_out_after_a_failed_run_of_the_same_task_is_accepted_and_others_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """zeroshot writes confusion.png before results.json: a run that failed between the two
    left a directory its rerun must be able to use, and another task must not."""
    from mmssl.eval.report import out_dir_problem

    out = tmp_path / "zs"
    out.mkdir()
    (out / "confusion.png").write_bytes(b"png")
    assert out_dir_problem(out, "zeroshot") is None
    assert "confusion.png" in (out_dir_problem(out, "retrieval") or "")
    assert "confusion.png" in (out_dir_problem(out, "fewshot") or "")


def test_a_training_run_directory_is_told_by_its_files_not_a_recipe_alone(tmp_path: Path) -> None:
    """A project folder holding the user's recipe.yaml and class file is no run directory."""
    from mmssl.eval.report import out_dir_problem
    from mmssl.train.run_lock import LOCK_NAME

    (tmp_path / "recipe.yaml").write_text("name: mine\n")
    (tmp_path / "classes.json").write_text("{}\n")
    assert out_dir_problem(tmp_path, "zeroshot") is None
    for marker in ("metrics.jsonl", "checkpoints"):
        run = tmp_path / marker.split(".")[0]
        run.mkdir()
        (run / "recipe.yaml").write_text("name: r\n")
        (run / "metrics.jsonl").write_text("") if marker == "metrics.jsonl" else (
            run / "checkpoints"
        ).mkdir()
        assert "training run directory" in (out_dir_problem(run, "zeroshot") or "")
    locked = tmp_path / "live"
    locked.mkdir()
    (locked / LOCK_NAME).write_bytes(b"")  # a run before its first log or checkpoint
    assert "training run directory" in (out_dir_problem(locked, "zeroshot") or "")


def test_a_failed_eval_into_a_path_with_dotdot_leaves_no_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--out sub/../new`: mkdir made `sub` too, which the failed run left behind."""
    monkeypatch.chdir(tmp_path)
    argv = ["retrieval", "--model", str(tmp_path / "nomodel"), "--data", "D"]
    assert main([*argv, "--out", "sub/../new"]) == 2
    capsys.readouterr()
    assert sorted(os.listdir(tmp_path)) == []


def test_an_eval_into_a_path_with_dotdot_writes_its_report_there(
    tmp_path: Path,
    tiny_model_dir: str,
    test_shards: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tasks write where run_task made the directory (through `sub` they found none)."""
    monkeypatch.chdir(tmp_path)
    argv = ["zeroshot", "--model", tiny_model_dir, "--data", test_shards, "--classes", "color"]
    assert main([*argv, "--label-field", "label", "--out", "sub/../new"]) == 0, capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [
        "confusion.png",
        "results.json",
        "summary.md",
    ]
    assert not (tmp_path / "sub").exists()


@pytest.mark.parametrize(
    "task, args",
    [
        ("zeroshot", ["--data", "d.tar", "--classes", "digit"]),
        ("retrieval", ["--data", "d.tar"]),
        ("linear", ["--train", "d.tar", "--test", "d.tar"]),
        ("lm", []),
    ],
)
def test_a_model_path_too_long_is_one_line(
    task: str, args: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A --model name longer than the file system takes (found by a fuzzer: a traceback)."""
    assert main([task, "--model", "x" * 300, *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "File name too long" in err, err
    assert not (tmp_path / "out").exists()
