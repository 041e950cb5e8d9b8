"""Paths written `~/x` in a recipe, a shard pattern, an export or a weights file mean the home
directory, as the shell and `--model` / `load_encoder` take them: `out_dir: ~/runs` made a
folder named "~" in the working directory (which `rm -rf ~` then "cleans up")."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmssl.data.urls import expand_urls
from mmssl.interop.weights import read_state_dict
from mmssl.train.ds_config import SHIPPED_DS, find_deepspeed_json
from mmssl.train.recipe import load_recipe

QUICK = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


def test_recipe_paths_expand_the_home_directory(home: Path) -> None:
    home.mkdir()
    shutil.copy(SHIPPED_DS / "zero2.json", home / "ds.json")
    shutil.copy(QUICK, home / "quick.yaml")
    recipe = load_recipe(
        "~/quick.yaml",
        [
            "out_dir=~/runs",
            "checkpoint.resume=~/old/checkpoints/step_00000001",
            "train.deepspeed=~/ds.json",
            "model.name=~/m.json",
            "data.tokenizer=~/tok",
            "train.init_from=~/export",
        ],
    )
    assert recipe.run_dir == home / "runs" / recipe.name
    assert recipe.checkpoint.resume == str(home / "old" / "checkpoints" / "step_00000001")
    assert recipe.model.name == str(home / "m.json")
    assert recipe.data.tokenizer == str(home / "tok")
    assert recipe.train.init_from == str(home / "export")
    assert find_deepspeed_json(recipe) == home / "ds.json"
    assert recipe.base_dir == str(home.resolve())
    # names without a leading ~ are left as they are
    plain = load_recipe(QUICK, ["checkpoint.resume=auto", "out_dir=a~b"])
    assert (plain.checkpoint.resume, plain.out_dir, plain.train.deepspeed) == (
        "auto",
        "a~b",
        "zero0",
    )


def test_shard_patterns_expand_the_home_directory(home: Path) -> None:
    assert expand_urls("~/d/a-{0..1}.tar::pipe:cat ~/x.tar") == [
        str(home / "d" / "a-0.tar"),
        str(home / "d" / "a-1.tar"),
        "pipe:cat ~/x.tar",  # a command's own text: the shell expands it
    ]


def test_weights_files_expand_the_home_directory(home: Path) -> None:
    home.mkdir()
    save_file({"w": torch.ones(2)}, str(home / "w.safetensors"))
    assert torch.equal(read_state_dict("~/w.safetensors")["w"], torch.ones(2))
