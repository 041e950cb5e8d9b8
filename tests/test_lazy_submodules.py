"""`import mmssl` then `mmssl.eval.finetune.Classifier`: the README names the API that way
(`mmssl.models.io.save_pretrained`, `mmssl.interop.load_open_clip`, ...), and each raised
AttributeError after a bare `import mmssl`, which imports no subpackage.  A fresh
interpreter per check: another test's imports would set the attributes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_every_dotted_name_the_readme_gives_resolves_after_import_mmssl() -> None:
    names = sorted(set(re.findall(r"\bmmssl(?:\.[A-Za-z_]\w*)+", README.read_text())))
    assert "mmssl.eval.finetune.Classifier" in names and len(names) >= 10
    code = (
        "import sys, mmssl\n"
        "heavy = [m for m in ('torch', 'deepspeed', 'sklearn') if m in sys.modules]\n"
        "assert not heavy, heavy  # import mmssl still does no work\n"
        f"for name in {names!r}:\n"
        "    obj = mmssl\n"
        "    for part in name.split('.')[1:]:\n"
        "        obj = getattr(obj, part)\n"
        "print('ok')\n"
    )
    assert _run(code) == "ok"


def test_other_names_are_attribute_errors_and_private_modules_are_not_imported() -> None:
    code = (
        "import sys, mmssl\n"
        "for obj, name in ((mmssl, 'nope'), (mmssl, '__main__'), (mmssl, '_shipped')):\n"
        "    try:\n"
        "        getattr(obj, name)\n"
        "    except AttributeError as err:\n"
        "        print(err)\n"
        "import mmssl.eval\n"
        "print(hasattr(mmssl.eval, 'finetune'), hasattr(mmssl.eval, 'finetuning'))\n"
        "print('mmssl.__main__' in sys.modules)\n"
    )
    assert _run(code).splitlines() == [
        "module 'mmssl' has no attribute 'nope'",
        "module 'mmssl' has no attribute '__main__'",  # would run the CLI
        "module 'mmssl' has no attribute '_shipped'",
        "True False",
        "False",
    ]


def test_a_submodule_that_does_not_import_is_an_attribute_error() -> None:
    """hasattr and getattr(..., default) expect AttributeError from a module __getattr__
    (PEP 562): without numba (the `fast` extra) `hasattr(mmssl.data, "fastviews")` raised
    ModuleNotFoundError; it is False now, and the error names the cause."""
    code = (
        "import sys\n"
        "sys.modules['numba'] = None  # as if not installed\n"
        "import mmssl.data\n"
        "print(hasattr(mmssl.data, 'fastviews'), getattr(mmssl.data, 'fastviews', 'default'))\n"
        "try:\n"
        "    mmssl.data.fastviews\n"
        "except AttributeError as err:\n"
        "    print(err)\n"
    )
    lines = _run(code).splitlines()
    assert lines[0] == "False default"
    assert lines[1].startswith(
        "module 'mmssl.data' has no attribute 'fastviews' (mmssl.data.fastviews does not "
        "import: import of numba halted"
    ), lines[1]
