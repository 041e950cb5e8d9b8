"""Every `from mmssl... import name` in the repository's code and scripts resolves, also the
imports inside functions (a bench's worker, a CLI's lazy import) that importing the module
does not run: a name moved to another module (ZeRO-3's helpers to `mmssl.train.zero3`)
left bench/bench_memory.py failing on every rank while every test passed."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _mmssl_imports(folders: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(file:line, module, name) of each `from mmssl... import name` under `folders`."""
    out = []
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmssl"):
                    where = f"{path.relative_to(REPO)}:{node.lineno}"
                    out += [(where, str(node.module), alias.name) for alias in node.names]
    return out


def test_every_mmssl_name_imported_by_the_code_and_scripts_exists() -> None:
    imports = _mmssl_imports(("mmssl", "bench", "tokenizer"))
    assert len(imports) > 500  # the walk found the code
    missing = []
    for where, module, name in imports:
        mod = importlib.import_module(module)
        if not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")  # a submodule
            except ImportError:
                missing.append(f"{where}: from {module} import {name}")
    assert not missing, missing
