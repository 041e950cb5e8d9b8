"""Helpers for the recipe tests (test_train_recipe*.py, test_train_engine_pieces.py): the
quickstart recipe, the `base` fixture (it with tiny overrides), and `_bad`, which runs
`mmssl train` on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import RECIPES, tiny_overrides

from mmssl.train.cli import main

QUICK = str(RECIPES / "quickstart.yaml")


def _bad(args: list[str], capsys: pytest.CaptureFixture[str], out: Path) -> str:
    """Run the CLI on bad input: exit code 2, one stderr line, nothing written."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mmssl train: error: "), err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir()), list(out.rglob("*"))
    return err


@pytest.fixture()
def base(demo_data: str, tmp_path: Path) -> list[str]:
    return [QUICK, *tiny_overrides(demo_data, str(tmp_path / "runs"), "bad")]
