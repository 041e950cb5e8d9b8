"""Where the files mmssl ships outside its package are: `recipes/` (run recipes, DeepSpeed
JSONs) and `tokenizer/default/` (the default tokenizer).

A checkout, and the editable install `make` makes of it, has them beside `mmssl/`; a wheel
carries copies in `mmssl/_shipped/` (setup.py's build step), so an installed package finds
them without the repository.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_IN_WHEEL = _PACKAGE / "_shipped"


def shipped_path(*parts: str) -> Path:
    """`shipped_path("recipes", "deepspeed")`: the wheel's copy when the package has one,
    else the checkout's folder (which may not exist: the callers say what is missing)."""
    root = _IN_WHEEL if _IN_WHEEL.is_dir() else _PACKAGE.parent
    return root.joinpath(*parts)
