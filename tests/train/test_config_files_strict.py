"""A recipe, its DeepSpeed JSON and a model JSON mean what they say: a section given as a
mapping on the command line keeps the recipe's other keys, a key YAML reads as a boolean is
an unknown key (one line, exit 2), and a JSON key given twice is refused, not the last one
kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import RECIPES, clean_env

from mmssl.models.registry import ModelFileError, resolve_model_config
from mmssl.schema import QUOTE_KEYS, ConfigError
from mmssl.train.ds_config import deepspeed_config
from mmssl.train.recipe import load_recipe, model_config

QUICK = RECIPES / "quickstart.yaml"


def test_a_section_given_as_a_mapping_keeps_the_recipes_other_keys() -> None:
    recipe = load_recipe(QUICK, ["train={steps: 5}", "objectives.simclr={temperature: 0.3}"])
    base = load_recipe(QUICK)
    assert recipe.train.steps == 5 and recipe.objectives["simclr"].temperature == 0.3
    assert recipe.train.micro_batch_size == base.train.micro_batch_size == 256  # not 32
    assert recipe.objectives["simclr"].weight == base.objectives["simclr"].weight
    assert set(recipe.objectives) == set(base.objectives)
    assert set(load_recipe(QUICK, ["objectives={simclr: {}}"]).objectives) == {"simclr"}


def test_a_model_override_section_given_as_a_mapping_keeps_the_recipes_other_keys() -> None:
    # `model.overrides.vision={depth: 3}` replaced the recipe's vision overrides (dim 96, mean
    # pooling) with the named model's: a mapping now means what the dotted keys mean
    mapping = model_config(load_recipe(QUICK, ["model.overrides.vision={depth: 3}"]))
    dotted = model_config(load_recipe(QUICK, ["model.overrides.vision.depth=3"]))
    assert mapping == dotted and mapping.vision.depth == 3
    assert mapping.vision.dim == model_config(load_recipe(QUICK)).vision.dim == 96
    # and in a model's own overrides: a block given as a mapping keeps the file's norm_eps
    cfg = resolve_model_config("clip_vit_b16", **{"vision.block": {"act": "quick_gelu"}})
    assert cfg.vision.block.act == "quick_gelu" and cfg.vision.block.norm_eps == 1e-5


def test_a_key_yaml_reads_as_a_boolean_exits_2_with_one_line(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("logging:\n  on: true\n")
    run = subprocess.run(
        [sys.executable, "-m", "mmssl", "train", str(recipe), "--validate"],
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"mmssl train: error: unknown key 'logging.True' ({QUOTE_KEYS})"
    ]


def test_a_deepspeed_json_naming_a_key_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 1}, "zero_optimization": {"stage": 3}}')
    recipe = load_recipe(QUICK, [f"train.deepspeed={path}"])
    with pytest.raises(ConfigError, match=r"ds\.json: key 'zero_optimization' is given twice"):
        deepspeed_config(recipe, 1)


def test_a_model_json_naming_a_key_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    text = json.dumps({"model": {"vision": {"depth": 2}}})
    path.write_text(text.replace('{"depth": 2}', '{"depth": 2, "depth": 4}'))
    with pytest.raises(ModelFileError, match=r"config\.json: key 'depth' is given twice"):
        resolve_model_config(str(path))
