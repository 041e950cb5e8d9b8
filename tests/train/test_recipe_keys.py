"""Errors about the recipe name the key as typed: `model.overrides.<key>` for the model's
settings, `data.sources.<name>` for a source, at `--validate` as in the run."""

from __future__ import annotations

import pytest
from train_helpers import RECIPES

from mmssl.data.errors import DataError
from mmssl.schema import ConfigError
from mmssl.train.recipe import load_recipe, model_config, validate
from mmssl.train.streams import build_stream

QUICK = str(RECIPES / "quickstart.yaml")
EPOCH_TEST_SPLIT = ["data.sources.digits_test.mode=epoch", "data.workers=8"]
TWO_RANKS = ["train.micro_batch_size=128", "data.sources.digits_test.mode=epoch"]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.overrides.vision.depth=x", "model.overrides.vision.depth: expected an integer"),
        ("model.overrides.vision=3", "model.overrides.vision: expected a mapping"),
        ("model.overrides.vision.dpth=3", "'model.overrides.vision.dpth'"),
        (
            "model.overrides.condition={layout: v2}",
            "model.overrides.condition: layout 'v2' is no augmentation descriptor version",
        ),
    ],
)
def test_a_model_override_error_names_the_key_typed(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        model_config(load_recipe(QUICK, [override]))
    assert named in str(caught.value)


def test_validate_runs_the_epoch_mode_shard_count_preflight() -> None:
    # 4 test shards for 1 rank x 8 loader workers; --validate used to pass
    with pytest.raises(
        ConfigError, match=r"^data\.sources\.digits_test: epoch mode .* 1 x 8 = 8, "
    ):
        validate(load_recipe(QUICK, EPOCH_TEST_SPLIT), 1, check_files=False)
    with pytest.raises(ConfigError, match=r"2 x 4 = 8, "):
        validate(load_recipe(QUICK, [*TWO_RANKS, "data.workers=4"]), 2, False)
    validate(load_recipe(QUICK, [*TWO_RANKS, "data.workers=2"]), 2, False)


def test_the_runs_shard_count_error_names_the_source(demo_data: str) -> None:
    recipe = load_recipe(
        QUICK,
        [
            f"data.sources.digits_test.urls={demo_data}/digits/test-{{000000..000003}}.tar",
            *EPOCH_TEST_SPLIT,
        ],
    )
    src = recipe.data.sources["digits_test"]
    cfg = model_config(recipe)
    with pytest.raises(DataError, match=r"^data\.sources\.digits_test: epoch mode needs"):
        build_stream("digits_test", src, recipe, cfg, rank=0, world_size=2)


@pytest.mark.parametrize("check_files", [False, True])
def test_a_malformed_brace_pattern_is_a_config_error_naming_the_source(check_files: bool) -> None:
    # in either mode: a recipe for another machine (check_files=False) is still expanded
    for mode in ("epoch", "resampled"):
        broken = ["data.sources.digits.urls=a-{0..1", f"data.sources.digits.mode={mode}"]
        recipe = load_recipe(QUICK, broken)
        with pytest.raises(ConfigError, match=r"^data\.sources\.digits\.urls: .*brace"):
            validate(recipe, 1, check_files=check_files)


def test_a_run_shorter_than_its_warmup_is_refused_with_a_warmup_that_fits() -> None:
    """quickstart's 30 warmup steps in a 20-step run: the error gives the run's length and
    a warmup that fits, which then validates."""
    with pytest.raises(ConfigError) as caught:
        validate(load_recipe(QUICK, ["train.steps=20"]), 1, check_files=False)
    msg = str(caught.value)
    assert msg.startswith("schedule.warmup_steps must be in 0..train.steps (20), got 30: ")
    fix = msg.rsplit(" ", 1)[-1]
    assert fix == "schedule.warmup_steps=2"
    validate(load_recipe(QUICK, ["train.steps=20", fix]), 1, check_files=False)
