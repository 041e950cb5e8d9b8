"""The lowest versions pyproject.toml accepts can run what mmssl uses.

tokenizers 0.19 (allowed before, and the one transformers 4.40-4.44 pin) has no
`Tokenizer.encode_batch_fast` and cannot read the shipped tokenizer.json, whose merges are
pairs: `get_tokenizer()` failed with "cannot read tokenizer file" and `get_tokenizer("clip")`
with an AttributeError on an install pip called complete (checked by hand with the 0.19.1
and 0.20.0 wheels: 0.20.0 runs both)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _floors() -> dict[str, tuple[int, ...]]:
    """Each `"name>=X.Y"` requirement of pyproject.toml (no tomllib: Python 3.10 lacks it)."""
    text = (ROOT / "pyproject.toml").read_text()
    return {
        name: tuple(int(p) for p in version.split("."))
        for name, version in re.findall(r'"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)"', text)
    }


def test_tokenizers_floor_has_what_mmssl_calls_and_reads() -> None:
    floors = _floors()
    code = "".join(p.read_text() for p in (ROOT / "mmssl" / "tokenizer").glob("*.py"))
    merges = json.loads((ROOT / "tokenizer" / "default" / "tokenizer.json").read_text())
    merges = merges["model"]["merges"]
    if "encode_batch_fast" in code or isinstance(merges[0], list):  # both new in 0.20
        assert floors["tokenizers"] >= (0, 20)
    # transformers before 4.45 requires tokenizers < 0.20: pip would pick the old one
    assert floors["transformers"] >= (4, 45)
