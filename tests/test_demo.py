"""`mmssl demo` into an output path it cannot use: one line and exit 2, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmssl.demo import main


@pytest.mark.parametrize("blocked", ["", "data", "runs/quickstart", "eval"])
def test_demo_refuses_an_output_path_that_is_a_file(tmp_path: Path, blocked: str, capsys):
    out = tmp_path / "out"
    file = out / blocked if blocked else out
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("keep\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["--out", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"mmssl demo: error: {file} exists and is not a directory"], err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # untouched
    assert file.read_text() == "keep\n"
