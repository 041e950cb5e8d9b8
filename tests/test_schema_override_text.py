"""A str field takes a command-line override's text: `name=42` was refused as "expected a
string, got 42", `name=no` as "got False".  Fields of other types parse it as before; a YAML
recipe file keeps YAML's types (`name: 42` there is an int, refused: quote it)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from mmssl.schema import ConfigError, apply_overrides, from_dict


@dataclass
class Fields:
    name: str = "run"
    note: str | None = None
    either: int | str = 0
    count: int = 1
    limit: int | None = None
    rate: float = 0.5
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    extra: dict[str, Any] = field(default_factory=dict)


def _fields(*overrides: str) -> Fields:
    return from_dict(Fields, apply_overrides({}, list(overrides), keep_text=True))


@pytest.mark.parametrize(
    "text", ["42", "no", "yes", "off", "true", "1.50", "1e5", "3.0e-4", "null", "~", "0x10", "-7"]
)
def test_a_str_field_takes_the_text_of_an_override(text: str) -> None:
    assert _fields(f"name={text}").name == text
    assert _fields(f"note={text}").note == (None if text in ("null", "~") else text)


def test_other_fields_parse_the_override_as_before() -> None:
    got = _fields("count=7", "limit=3", "rate=3e-4", "flag=no", "either=42", "extra.k=1e-3")
    assert (got.count, got.limit, got.rate, got.flag) == (7, 3, 3e-4, False)
    assert got.either == 42 and _fields("either=x").either == "x"
    assert got.extra == {"k": 1e-3} and type(got.extra["k"]) is float  # Any: the value
    assert _fields("limit=null").limit is None
    assert _fields("name='quoted'").name == "quoted"  # YAML quotes still unquote
    for override, says in [
        ("count=x", "count: expected an integer, got 'x'"),
        ("count=true", "count: expected an integer, got True"),
        ("count=1.5", "count: expected an integer, got 1.5"),
        ("rate=no", "rate: expected a number, got False"),
        ("flag=1", "flag: expected true/false, got 1"),
        ("mode=true", "mode: True is not one of"),
        ("name=[1, 2]", "name: expected a string, got [1, 2]"),
    ]:
        with pytest.raises(ConfigError, match="^" + re.escape(says)):
            _fields(override)
    # without keep_text the result is plain data, as before
    assert apply_overrides({}, ["a=42", "b.c=no"]) == {"a": 42, "b": {"c": False}}
    assert apply_overrides({}, ["a=null", "a.b=1"], keep_text=True)["a"]["b"].value == 1


def test_a_recipe_takes_number_and_boolean_like_text_for_its_str_fields(tmp_path: Path) -> None:
    from mmssl.train.recipe import dump_recipe, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("train: {steps: 2}\n")
    recipe = load_recipe(
        path,
        [
            "name=42",
            "out_dir=no",
            "objectives.clip.condition_prompt=1e5",
            "objectives.clip.gather=null",
            "train.stop_at=1",
            "optim.lr=3e-4",
            "logging.progress=off",
            "data.augment.hue=0.25",
        ],
    )
    assert (recipe.name, recipe.out_dir) == ("42", "no")
    assert recipe.objectives["clip"].condition_prompt == "1e5"
    assert recipe.objectives["clip"].gather is None
    assert (recipe.train.stop_at, recipe.optim.lr, recipe.logging.progress) == (1, 3e-4, False)
    assert recipe.data.augment == {"hue": 0.25}
    assert yaml.safe_load(dump_recipe(recipe))["name"] == "42"
    with pytest.raises(ConfigError, match="train.steps: expected an integer, got 'x'"):
        load_recipe(path, ["train.steps=x"])
    # the YAML file keeps YAML's types: an unquoted 42 there is a number
    path.write_text("name: 42\n")
    with pytest.raises(ConfigError, match="name: expected a string, got 42"):
        load_recipe(path)
    path.write_text("name: '42'\n")
    assert load_recipe(path).name == "42"


def test_the_train_cli_validates_a_run_named_by_a_number(tmp_path: Path, capsys) -> None:
    from mmssl.train.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(f"train: {{steps: 2}}\nout_dir: {tmp_path}\n")
    assert main([str(path), "name=42", "--validate", "--world-size", "1"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "42"
