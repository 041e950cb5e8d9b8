"""The lowest versions pyproject.toml accepts can run what mmssl uses.

Each floor below was found by installing the declared floors in a fresh venv and running the
quick tests (2026-12-07: 206 failed at the old floors), then bisecting the releases: the
first one that runs is the floor.  tokenizers 0.19 (allowed before, and the one transformers
4.40-4.44 pin) has no `Tokenizer.encode_batch_fast` and cannot read the shipped
tokenizer.json, whose merges are pairs: `get_tokenizer()` failed with "cannot read tokenizer
file" and `get_tokenizer("clip")` with an AttributeError on an install pip called complete."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _floors() -> dict[str, tuple[int, ...]]:
    """Each `"name>=X.Y"` requirement of pyproject.toml (no tomllib: Python 3.10 lacks it)."""
    text = (ROOT / "pyproject.toml").read_text()
    return {
        name.lower(): tuple(int(p) for p in version.split("."))
        for name, version in re.findall(r'"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)"', text)
    }


NEEDS = [
    ("torch", (2, 10), "train.compile sets torch._functorch.config."
     "force_non_lazy_backward_lowering (new in 2.10; before it every compiled step raised "
     "AttributeError); linear_cross_entropy's int32 targets need gather's int32 index (2.8)"),
    ("torchvision", (0, 25), "the release that requires torch 2.10"),
    ("pydantic", (2, 3), "deepspeed 0.19.8's ZeRO config default sys.maxsize fails to validate "
     "before 2.3: every recipe was refused"),
    ("sentencepiece", (0, 2, 2), "a corpus reader's error surfaced as SystemError (a traceback, "
     "exit 1) from SentencePieceTrainer before 0.2.2"),
    ("timm", (1, 0, 23), "mmssl.interop.timm reads Attention.attn_dim, new in 1.0.23 (before it "
     "load_timm_vit raised AttributeError, or timm_vit_config called the name unknown)"),
    ("tokenizers", (0, 20), "Tokenizer.encode_batch_fast and the merges-as-pairs tokenizer.json"),
    ("transformers", (4, 45), "transformers before 4.45 requires tokenizers < 0.20"),
]  # fmt: skip


@pytest.mark.parametrize("name, floor, why", NEEDS, ids=[n for n, _, _ in NEEDS])
def test_each_floor_runs_what_mmssl_uses(name: str, floor: tuple[int, ...], why: str) -> None:
    assert _floors()[name] >= floor, why


def test_the_code_still_uses_what_the_tokenizers_floor_is_for() -> None:
    """If neither is used any more, the tokenizers floor may go back down."""
    code = "".join(p.read_text() for p in (ROOT / "mmssl" / "tokenizer").glob("*.py"))
    merges = json.loads((ROOT / "tokenizer" / "default" / "tokenizer.json").read_text())
    assert "encode_batch_fast" in code or isinstance(merges["model"]["merges"][0], list)
