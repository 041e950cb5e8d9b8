"""The digit experiments (recipes/experiments/*_digits.py) refuse bad arguments with one
line and exit 2, before anything is written: no untrained model recorded as a result, no
empty table, no traceback after the output directory is made."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "recipes" / "experiments"
SCRIPTS = ["hssl_digits", "conditioning_digits"]


def _load(name: str, monkeypatch):
    """The experiment script as a module, with its own `common` (bench/ has one too)."""
    monkeypatch.delitem(sys.modules, "common", raising=False)
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BAD = [
    (["--steps", "-3"], "--steps must be >= 1, got -3"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--seeds"], "--seeds needs at least one seed"),
    (["--seeds", "0", "-1"], "--seeds must be >= 0 (numpy seeds), got -1"),
    (["--variants"], "--variants needs at least one variant"),
    (["--batch-size", "0", "--steps", "1"], "--batch-size must be >= 2, got 0"),
    (["--batch-size", "1", "--steps", "1"], "--batch-size must be >= 2, got 1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--threads", "-2"], "--threads must be >= 1, got -2"),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(("argv", "error"), BAD)
def test_bad_arguments_exit_2_before_anything_is_written(
    script: str, argv: list[str], error: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    import torch

    def started(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(torch, "set_num_threads", started)
    module = _load(script, monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--out", str(out), *argv])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith(error), errors
    assert not out.exists()


def test_a_batch_larger_than_the_training_split_is_refused_before_any_run(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import torch

    module = _load("hssl_digits", monkeypatch)
    out = tmp_path / "out"
    before = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--out", str(out), "--batch-size", "100000", "--variants", "hssl"])
    finally:
        torch.set_num_threads(before)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--batch-size must be at most the" in errors[0], errors
    assert "training images, got 100000" in errors[0]
    assert not (out / "results.jsonl").exists()


def test_run_grid_reruns_a_variant_with_another_setting_and_keeps_each_apart(
    tmp_path: Path, monkeypatch
) -> None:
    """A second run with another batch size took the first's rows as done and trained
    nothing; the table then showed the other batch size's results."""
    monkeypatch.delitem(sys.modules, "common", raising=False)
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import common

    calls = []

    def run(variant: str, seed: int) -> dict:
        calls.append((variant, seed))
        return {"variant": variant, "seed": seed, "steps": 5, "acc": len(calls)}

    first = common.run_grid(tmp_path, ["plain"], [0], 5, run, {"batch_size": 32})
    again = common.run_grid(tmp_path, ["plain"], [0], 5, run, {"batch_size": 32})
    other = common.run_grid(tmp_path, ["plain"], [0], 5, run, {"batch_size": 256})
    assert calls == [("plain", 0), ("plain", 0)]  # done once per setting
    assert first == again and [r["acc"] for r in first] == [1] and first[0]["batch_size"] == 32
    assert [(r["acc"], r["batch_size"]) for r in other] == [(2, 256)]
