"""The build step pyproject.toml cannot say: a wheel carries the files mmssl ships beside its
package (the run recipes, the DeepSpeed JSONs, the default tokenizer) as mmssl/_shipped/,
where `mmssl.shipped` finds them in an installed package.  An editable install (`make`)
reads them from the checkout instead, so nothing is copied then.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
# what `mmssl.shipped.shipped_path` may be asked for, relative to the repository
SHIPPED = ("recipes/*.yaml", "recipes/deepspeed/*.json", "tokenizer/default/*")


class BuildWithShipped(build_py):
    """build_py, then the SHIPPED files copied to BUILD/mmssl/_shipped/."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "mmssl" / "_shipped"
        shutil.rmtree(dest, ignore_errors=True)  # an earlier build's copy of a deleted file
        for pattern in SHIPPED:
            files = sorted(
                f for f in HERE.glob(pattern) if f.is_file() and not f.name.startswith(".")
            )
            if not files:  # a wheel without them fails at run time, far from here
                raise FileNotFoundError(f"setup.py: nothing matches {pattern} in {HERE}")
            for f in files:
                target = dest / f.relative_to(HERE)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)


setup(cmdclass={"build_py": BuildWithShipped})
