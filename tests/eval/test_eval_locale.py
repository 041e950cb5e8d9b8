"""`mmssl eval` under an ASCII locale (LC_ALL=C without Python's UTF-8 mode): class names
beyond ASCII are read from their UTF-8 file, written to summary.md in UTF-8, and printed as
escapes; the command ended in UnicodeEncodeError at its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_zeroshot_with_accented_class_names_under_an_ascii_locale(
    tmp_path: Path, tiny_model_dir: str, test_shards: str
) -> None:
    classes = tmp_path / "classes.json"
    names = ["zéro", "un", "deux"]
    classes.write_text(json.dumps({"classnames": names}, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "zs"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env.pop("PYTHONIOENCODING", None)
    argv = ["eval", "zeroshot", "--model", tiny_model_dir, "--data", test_shards]
    argv += ["--classes", str(classes), "--label-field", "label", "--out", str(out)]
    run = subprocess.run(
        [sys.executable, "-m", "mmssl.cli", *argv], env=env, capture_output=True, timeout=300
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    assert b"z\\xe9ro" in run.stdout  # the console's escape
    assert "| zéro |" in (out / "summary.md").read_text(encoding="utf-8")
    assert (
        "zéro"
        in json.loads((out / "results.json").read_text(encoding="utf-8"))["results"]["per_class"]
    )
