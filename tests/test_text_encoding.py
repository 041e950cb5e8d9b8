"""Text files are read and written in UTF-8 whatever the locale, and the CLI prints what the
locale cannot hold as escapes.  Under an ASCII locale (LC_ALL=C without Python's UTF-8
mode) `mmssl eval fewshot` and the demo ended in UnicodeEncodeError at their report (its
"±"), and a UTF-8 class file with "zéro" was "not valid JSON"."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import mmssl

PACKAGE = Path(mmssl.__file__).parent
# modules named `open` whose first argument is no text file (os.open takes flags; the others
# open binary files or archives)
NOT_TEXT_OPEN = ("os", "tarfile", "Image", "gzip", "io", "zipfile")


def _unspecified(node: ast.Call) -> str | None:
    """What a call leaves to the locale: a text-mode open(), Path.read_text/write_text
    without encoding=; None otherwise."""
    f, kws = node.func, {k.arg for k in node.keywords}
    if "encoding" in kws:
        return None
    if isinstance(f, ast.Attribute) and f.attr in ("read_text", "write_text"):
        return f.attr
    is_open = isinstance(f, ast.Name) and f.id == "open"
    if isinstance(f, ast.Attribute) and f.attr == "open":
        is_open = not (isinstance(f.value, ast.Name) and f.value.id in NOT_TEXT_OPEN)
    if not is_open:
        return None
    mode = node.args[1] if len(node.args) > 1 else None
    mode = next((k.value for k in node.keywords if k.arg == "mode"), mode)
    if isinstance(mode, ast.Constant) and "b" in str(mode.value):
        return None
    return "open"


def test_every_text_file_the_package_opens_names_its_encoding() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and (what := _unspecified(node)):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {what}")
    assert not found, "encoding= missing (the locale's would be used):\n" + "\n".join(found)


def test_the_scan_sees_what_it_looks_for() -> None:
    """The check above cannot pass by seeing nothing."""
    calls = [
        'open(p, "w")',
        "p.read_text()",
        'p.write_text("x")',
        "open(p)",
        'open(p, "rb")',
        'open(p, encoding="utf-8")',
        "os.open(p, 0)",
    ]
    seen = [_unspecified(ast.parse(c).body[0].value) for c in calls]  # type: ignore[attr-defined]
    assert seen == ["open", "read_text", "write_text", "open", None, None, None]


def test_an_ascii_locale_reads_and_writes_utf8_and_prints_escapes(tmp_path: Path) -> None:
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"classnames": ["zéro", "un"]}, ensure_ascii=False), "utf-8")
    # ASCII only: the command line itself is decoded by the locale
    script = f"""
import sys
from pathlib import Path
from mmssl.atomic import write_atomic
from mmssl.cliargs import tolerant_streams
from mmssl.eval.zeroshot import load_classes

assert sys.flags.utf8_mode == 0 and sys.stdout.encoding.lower() in ("ascii", "ansi_x3.4-1968")
write_atomic(Path({str(tmp_path / "summary.md")!r}), "top-1 0.5 \\u00b1 0.1")
print(load_classes({str(classes)!r}).classnames == ["z\\u00e9ro", "un"], file=sys.stderr)
tolerant_streams()
print("accuracy \\u00b1 std")
"""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env.pop("PYTHONIOENCODING", None)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert (tmp_path / "summary.md").read_bytes() == "top-1 0.5 ± 0.1".encode()
    assert run.stderr.strip().endswith(b"True")
    assert run.stdout == b"accuracy \\xb1 std\n"


def test_a_run_name_an_ascii_locale_cannot_hold_is_one_line(tmp_path: Path) -> None:
    """os.fsencode raised UnicodeEncodeError from the run-directory check: a traceback."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        'name: "z\\u00e9ro"\n'  # YAML's escape: the file itself is ASCII
        f"out_dir: {tmp_path / 'runs'}\n"
        "model: {name: test_tiny_clip}\n"
        "data: {sources: {train: {urls: synthetic}}}\n"
        "train: {steps: 1, global_batch_size: 4, micro_batch_size: 4}\n",
        encoding="utf-8",
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    run = subprocess.run(
        [sys.executable, "-m", "mmssl.cli", "train", str(recipe), "--validate"],
        env=env,
        capture_output=True,
        timeout=300,
    )
    err = [line for line in run.stderr.decode().splitlines() if "mmssl train" in line]
    assert run.returncode == 2 and len(err) == 1, run.stderr.decode(errors="replace")[-2000:]
    assert "file-name encoding (ascii) cannot hold; set a UTF-8 locale" in err[0]
    assert not (tmp_path / "runs").exists()
