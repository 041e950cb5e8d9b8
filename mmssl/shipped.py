"""Where the files mmssl ships outside its package are: `recipes/` (run recipes, DeepSpeed
JSONs) and `tokenizer/default/` (the default tokenizer).

A checkout, and the editable install `make` makes of it, has them beside `mmssl/`; a wheel
carries copies in `mmssl/_shipped/` (setup.py's build step), so an installed package finds
them without the repository.  A package inside a checkout always reads the checkout's: a
stray `_shipped` copy there would otherwise hide edits to the recipes or the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def in_checkout(package: Path = _PACKAGE) -> bool:
    """Whether the package is a checkout's `mmssl/` (its pyproject.toml beside it)."""
    return (package.parent / "pyproject.toml").is_file()


def shipped_path(*parts: str, package: Path = _PACKAGE) -> Path:
    """`shipped_path("recipes", "deepspeed")`: the checkout's folder, or in an installed
    package the wheel's copy (either may be missing: the callers say what is)."""
    root = package.parent if in_checkout(package) else package / "_shipped"
    return root.joinpath(*parts)
