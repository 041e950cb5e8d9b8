"""Recipes that earlier runs recorded stay readable.  Export, evaluation and resume read a
run's RUN/recipe.yaml (and its run record's recipe) through this version's schema, and both
hold every field, defaults included: renaming or removing a field breaks every older run
(renaming objectives.NAME.hidden once did).  A change that must rename one adds a migration,
and keeps these files loading."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmssl.train.recipe import load_recipe, validate

RECORDED = Path(__file__).parent / "recorded"


@pytest.mark.parametrize("path", sorted(RECORDED.glob("*.yaml")), ids=lambda p: p.stem)
def test_a_recorded_recipe_still_loads_and_validates(path: Path) -> None:
    validate(load_recipe(str(path), []), 1, check_files=False)


def test_there_are_recorded_recipes() -> None:
    assert sorted(RECORDED.glob("*.yaml"))
