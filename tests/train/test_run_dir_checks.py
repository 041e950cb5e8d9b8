"""An output directory that cannot be made is a bad argument: one line naming the key and
exit 2, from `--validate` too, before anything is written (it was exit 0 with --validate, and
a NotADirectoryError traceback once the engine was built)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from train_helpers import synthetic_recipe

pytestmark = pytest.mark.usefixtures("one_process_group")


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def _one_line(capsys: pytest.CaptureFixture[str], prog: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # DeepSpeed's import may log a warning first
    assert last.startswith(f"{prog}: error: "), err
    return last


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("where", ["out_dir", "name", "above"])
def test_a_file_in_the_way_of_the_run_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], validate: bool, where: str
) -> None:
    from mmssl.train.cli import main

    recipe = synthetic_recipe(tmp_path, "r", 2)
    (tmp_path / "afile").write_text("")
    overrides = {
        "out_dir": [f"out_dir={tmp_path / 'afile'}"],  # out_dir/name under a file
        "name": ["name=afile"],  # the run directory itself is a file
        "above": [f"out_dir={tmp_path / 'afile' / 'deeper'}"],
    }[where]
    before = _files(tmp_path)
    assert main([str(recipe), *overrides, *(["--validate"] if validate else [])]) == 2
    line = _one_line(capsys, "mmssl train")
    key = "name" if where == "name" else "out_dir"
    assert line.startswith(f"mmssl train: error: {key}: "), line
    assert f"{tmp_path / 'afile'} is not a directory" in line, line
    assert _files(tmp_path) == before


def test_a_read_only_directory_above_the_run_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """(os.access stands in for a read-only directory: the tests may run as root.)"""
    from mmssl.train.cli import main

    recipe = synthetic_recipe(tmp_path, "r", 2)
    ro = tmp_path / "ro"
    ro.mkdir()
    mkdir = os.mkdir  # root may write anywhere: the check's trial directory is refused

    def refuse(path, mode=0o777):
        if Path(path).parent == ro:
            raise PermissionError(13, "Permission denied", str(path))
        mkdir(path, mode)

    monkeypatch.setattr(os, "mkdir", refuse)
    assert main([str(recipe), f"out_dir={ro / 'runs'}", "--validate"]) == 2
    line = _one_line(capsys, "mmssl train")
    assert line.startswith("mmssl train: error: out_dir: "), line
    assert f"{ro} is not writable" in line, line
    assert not list(ro.iterdir())


def test_a_run_directory_that_fails_after_validation_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file put in the way after validation (here: validation's check skipped) fails the
    mkdir of the run: one line and exit 2, not a traceback."""
    import mmssl.train.file_checks
    from mmssl.train.cli import main

    monkeypatch.setattr(mmssl.train.file_checks, "check_run_dir", lambda recipe: None)
    recipe = synthetic_recipe(tmp_path, "r", 2)
    (tmp_path / "afile").write_text("")
    assert main([str(recipe), f"out_dir={tmp_path / 'afile'}"]) == 2
    line = _one_line(capsys, "mmssl train")
    assert line.startswith("mmssl train: error: out_dir: cannot make the run directory"), line


def test_eval_out_under_a_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mmssl.eval.cli import main

    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "sub"
    argv = ["zeroshot", "--model", "m", "--data", "d", "--classes", "a,b", "--out", str(out)]
    assert main(argv) == 2
    line = _one_line(capsys, "mmssl eval")
    assert line.startswith(f"mmssl eval: error: --out {out}: cannot make the directory"), line


def test_a_run_name_longer_than_the_file_system_allows_is_refused_by_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """(the check shared with `mmssl tokenizer train`): an ENAMETOOLONG traceback after the
    engine was built before."""
    from mmssl.train.cli import main

    recipe = synthetic_recipe(tmp_path, "r", 2)
    assert main([str(recipe), f"name={'n' * 300}", "--validate"]) == 2
    line = _one_line(capsys, "mmssl train")
    assert line.startswith("mmssl train: error: name: "), line
    assert "has a name longer than 255 bytes" in line, line
