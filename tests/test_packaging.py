"""An installed wheel works without the repository: it carries the shipped recipes, DeepSpeed
JSONs and default tokenizer (setup.py copies them into mmssl/_shipped), and the code finds
them there.  Before, `mmssl demo`, `get_tokenizer()` and every recipe naming `zero0` failed
from a pip-installed package (they looked for the repository's folders beside site-packages).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (
    "mmssl",
    "recipes",
    "tokenizer",
    "pyproject.toml",
    "setup.py",
    "README.md",
    "MANIFEST.in",
)

CHECK = """
import json, sys
from pathlib import Path
import mmssl
from mmssl.demo import RECIPE
from mmssl.tokenizer import get_tokenizer
from mmssl.train.ds_config import find_deepspeed_json
from mmssl.train.recipe import load_recipe, validate

site = Path(sys.argv[1]).resolve()
from mmssl.tokenizer.train import main as tokenizer_main

rebuild = tokenizer_main(["train", "--default", "--quiet"])  # not into the wheel's copy
recipe = load_recipe(RECIPE)
validate(recipe, check_files=False)
print(json.dumps({
    "package": mmssl.__file__,
    "in_site": Path(mmssl.__file__).resolve().is_relative_to(site),
    "recipe": str(RECIPE),
    "tokenizer_sha256": get_tokenizer().sha256,
    "zero2": str(find_deepspeed_json(load_recipe(RECIPE, ["train.deepspeed=zero2"]))),
    "rebuild": rebuild,
}))
"""


@pytest.mark.slow
def test_installed_wheel_finds_its_shipped_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(dist), str(src)],
        check=True, cwd=tmp_path, capture_output=True,
    )  # fmt: skip
    (wheel,) = dist.glob("mmssl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in (
        "recipes/quickstart.yaml",
        "recipes/deepspeed/zero0.json",
        "recipes/deepspeed/zero3_offload.json",
        "tokenizer/default/tokenizer.json",
        "tokenizer/default/tokenizer_meta.json",
    ):
        assert f"mmssl/_shipped/{shipped}" in names, shipped
    assert not [n for n in names if n.startswith(("tests/", "recipes/", "tokenizer/"))]
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"  # not the repository, nor next to it
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", CHECK, str(site)],
        cwd=elsewhere, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["in_site"], got  # the wheel's package, not the checkout's editable install
    shipped = site / "mmssl" / "_shipped"
    assert Path(got["recipe"]) == shipped / "recipes" / "quickstart.yaml"
    assert Path(got["zero2"]) == shipped / "recipes" / "deepspeed" / "zero2.json"
    from mmssl.tokenizer import get_tokenizer

    assert got["tokenizer_sha256"] == get_tokenizer().sha256
    assert (
        got["rebuild"] == 2 and "this package is installed" in out.stderr and "--out" in out.stderr
    )


def test_a_checkout_reads_its_own_folders_not_a_stray_copy(tmp_path: Path) -> None:
    """In a checkout (pyproject.toml beside mmssl/) the checkout's recipes/ and tokenizer/ are
    read even when a stray mmssl/_shipped holds older copies; installed, the wheel's copy."""
    from mmssl.shipped import in_checkout, shipped_path

    checkout = tmp_path / "checkout"
    (checkout / "mmssl" / "_shipped" / "recipes").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("[project]\n")
    package = checkout / "mmssl"
    assert in_checkout(package)
    assert shipped_path("recipes", "x.yaml", package=package) == checkout / "recipes" / "x.yaml"
    installed = tmp_path / "site-packages" / "mmssl"
    (installed / "_shipped").mkdir(parents=True)
    assert not in_checkout(installed)
    assert shipped_path("tokenizer", package=installed) == installed / "_shipped" / "tokenizer"
    assert in_checkout() and shipped_path("recipes") == ROOT / "recipes"  # this repository
