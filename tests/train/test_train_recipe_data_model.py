"""A recipe's data, model and tokenizer, checked at validation (no training): data sources
(missing or repeated shards, held-out sources, epoch mode over pipes, the pixel limit),
the numba augmentation backend, model sizes, model files and exports named as the model,
the descriptor layout, and the tokenizer a run would load."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from recipe_helpers import QUICK, _bad
from recipe_helpers import base as base  # a fixture
from train_helpers import tiny_overrides

from mmssl.schema import ConfigError
from mmssl.train.cli import main
from mmssl.train.recipe import load_recipe, validate


def test_a_mistyped_held_out_source_is_named_before_the_source_it_leaves_unread(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # it said "data.sources.digits_test: no objective or eval.sources reads it (did you mean
    # 'digits_tst'?)", inviting the user to rename the right source to the typo
    err = _bad([*base, "eval.sources.digits=digits_tst"], capsys, tmp_path)
    assert "eval.sources.digits: no data source 'digits_tst' (did you mean 'digits_test'?)" in err


def test_missing_shards(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "nowhere" / "train-{000000..000003}.tar")
    err = _bad([*base, f"data.sources.digits.urls={missing}"], capsys, tmp_path / "runs")
    assert "data.sources.digits.urls" in err and "nowhere" in err


def test_an_epoch_source_listing_a_shard_twice(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_data: str
) -> None:
    """Refused at --validate, before a run reads the shard twice each epoch; resampled mode
    draws from the list, where a repeat weights the shard."""
    twice = f"data.sources.digits.urls={demo_data}/digits/train-{{000000,000001,000000}}.tar"
    err = _bad([*base, twice, "data.sources.digits.mode=epoch"], capsys, tmp_path / "runs")
    assert "data.sources.digits.urls" in err and "lists a shard twice" in err
    recipe = load_recipe(QUICK, [*base[1:], twice])
    validate(recipe, 1, check_files=True)


def test_sizes_the_layers_refuse_are_named_at_validation(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A width its attention heads do not divide passed --validate, and the run then died in
    a traceback while building the model; validation now builds it on the meta device."""
    runs = tmp_path / "runs"
    for key, override, dim, heads in (("vision", "dim=33", 33, 2), ("text", "num_heads=3", 32, 3)):
        err = _bad([*base, f"model.overrides.{key}.{override}"], capsys, runs)
        assert f"model: dim {dim} is not divisible by num_heads {heads}" in err, err
    # a zero-width projector built (zero-size Linear layers) and trained on nothing
    for key in ("hidden_dim", "out_dim"):
        err = _bad([*base, f"model.overrides.projector={{{key}: 0}}"], capsys, runs)
        assert f"model.overrides.projector.{key} must be >= 1, got 0" in err, err


def test_epoch_mode_over_pipes_takes_the_recipes_epoch_batches(
    demo_data: str, tmp_path: Path
) -> None:
    """pipe: shards have no manifest to count: the error advised `Source.epoch_batches`, which
    a recipe could not set ("unknown key"); data.sources.NAME.epoch_batches is that length."""
    from mmssl.data.errors import DataError
    from mmssl.train.streams import build_stream

    pipes = f"pipe:cat {demo_data}/digits/train-{{000000..000003}}.tar"
    args = [*tiny_overrides(demo_data, str(tmp_path), "p"), f"data.sources.digits.urls={pipes}"]
    recipe = load_recipe(QUICK, [*args, "data.sources.digits.mode=epoch"])
    model_cfg = validate(recipe, 1, check_files=False).model
    with pytest.raises(DataError, match=re.escape("data.sources.NAME.epoch_batches")):
        build_stream("digits", recipe.data.sources["digits"], recipe, model_cfg, 0, 1)
    recipe = load_recipe(
        QUICK, [*args, "data.sources.digits.mode=epoch", "data.sources.digits.epoch_batches=3"]
    )
    stream = build_stream("digits", recipe.data.sources["digits"], recipe, model_cfg, 0, 1)
    assert len(stream.loader) == 3
    for bad in (
        ["data.sources.digits.mode=epoch", "data.sources.digits.epoch_batches=0"],
        ["data.sources.digits.epoch_batches=3"],
    ):
        with pytest.raises(ConfigError, match="epoch_batches must be >= 1 and needs mode=epoch"):
            validate(load_recipe(QUICK, [*args, *bad]), 1, check_files=False)


def test_the_pixel_limit_of_decoded_images_is_a_recipe_key(demo_data: str, tmp_path: Path) -> None:
    """A 61 MP camera photo was an image_too_large skip that no recipe key could allow."""
    from mmssl.data.decode import DEFAULT_MAX_PIXELS
    from mmssl.train.recipe import DataConfig
    from mmssl.train.streams import build_stream

    assert DataConfig().max_pixels == DEFAULT_MAX_PIXELS
    args = tiny_overrides(demo_data, str(tmp_path), "px")
    recipe = load_recipe(QUICK, [*args, "data.max_pixels=70000000"])
    model_cfg = validate(recipe, 1, check_files=False).model
    stream = build_stream("digits", recipe.data.sources["digits"], recipe, model_cfg, 0, 1)
    assert stream.loader.plan.max_pixels == 70_000_000
    with pytest.raises(ConfigError, match="data.max_pixels must be >= 1"):
        validate(load_recipe(QUICK, [*args, "data.max_pixels=0"]), 1, check_files=False)


def test_a_held_out_source_that_trains_is_refused(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """eval.sources may not name a source an objective reads, nor one listing its shards:
    the 'held-out' loss was measured on training data without a word."""
    recipe = load_recipe(QUICK, tiny_overrides("/x", "/y", "n"))
    recipe.eval.every, recipe.eval.sources["digits"] = 2, "digits"
    del recipe.data.sources["digits_test"]
    with pytest.raises(ConfigError, match="eval.sources.digits: 'digits' is a training source"):
        validate(recipe, 1, check_files=False)
    recipe = load_recipe(QUICK, tiny_overrides("/x", "/y", "n"))
    recipe.eval.every = 2
    recipe.data.sources["digits_test"].urls = recipe.data.sources["digits"].urls
    with pytest.raises(ConfigError, match="'digits_test' shares shards with a training source"):
        validate(recipe, 1, check_files=False)


def test_a_model_name_that_is_an_export_says_its_weights_are_not_loaded(tmp_path, caplog):
    """A recipe naming an export as its model trained from random weights without a word (the
    run record kept the export's path, as if warm-started); create_model warned, training
    did not."""
    import logging

    from train_helpers import synthetic_recipe

    import mmssl
    from mmssl.models.io import save_pretrained
    from mmssl.train.recipe import load_recipe, validate

    export = save_pretrained(mmssl.create_model("test_tiny_clip"), tmp_path / "exp")
    recipe = synthetic_recipe(tmp_path, "warm", 1)
    with caplog.at_level(logging.WARNING, logger="mmssl.train"):
        validate(load_recipe(recipe), world_size=1, check_files=False)
        assert "is an export" not in caplog.text
        validate(load_recipe(recipe, [f"model.name={export}"]), world_size=1, check_files=False)
    assert "is an export" in caplog.text and "model.safetensors is not loaded" in caplog.text


def test_numba_backend_without_numba(
    base: list[str],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reloaded_compiled: None,
) -> None:
    """backend numba on a machine without numba is refused before the run starts (it died at
    the first batch, in a data worker); backend auto trains with torch then."""
    import sys

    for name in ("numba", "mmssl.data.fastviews", "mmssl.data.fastdraws"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    runs = tmp_path / "runs"
    err = _bad([*base, "data.augment.backend=numba"], capsys, runs)
    assert "data.augment.backend: backend numba, but numba cannot be imported" in err
    err = _bad([*base, "data.view_augment=[{}, {backend: numba}]"], capsys, runs)
    assert "data.view_augment[1].backend: backend numba, but numba cannot be" in err
    # every view overrides it back: nothing renders with numba
    both = "data.view_augment=[{backend: auto}, {backend: torch}]"
    assert main([*base, "data.augment.backend=numba", both, "--validate"]) == 0
    assert main([*base, "data.augment.backend=auto", "--validate"]) == 0
    capsys.readouterr()
    # a recipe for another machine (check_files=False, as `mmssl plan`) is not asked for numba
    validate(load_recipe(base[0], [*base[1:], "data.augment.backend=numba"]), check_files=False)


def test_numba_backend_with_numba_switched_off(
    base: list[str],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reloaded_compiled: None,
) -> None:
    """An installed numba that cannot compile (NUMBA_DISABLE_JIT; a read-only install
    without a cache folder, as mmssl.data.decode.compiled_problem words it) passed
    validation, and the run died at its first batch saying 'needs numba'."""
    numba = pytest.importorskip("numba")
    from mmssl.data import fastdraws, fastviews  # noqa: F401  # compiled before the switch

    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
    err = _bad([*base, "data.augment.backend=numba"], capsys, tmp_path / "runs")
    assert err == (
        "mmssl train: error: data.augment.backend: backend numba, but NUMBA_DISABLE_JIT is "
        "set, so numba compiles nothing; unset it; or use backend auto (torch renders then)\n"
    )


def test_a_descriptor_layout_other_than_the_pipelines_is_refused(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch
) -> None:
    """A layout registered beside v1 (here v1's groups, crop first) passed validation, and
    the model read the pipeline's v1 descriptors, and its own neutral one, by it."""
    from mmssl import descriptor

    v1 = descriptor.DESCRIPTOR_V1
    order = ["crop", "blur", "color", "color_diff", "grayscale"]
    groups = [(g.name, g.dim, g.binary) for n in order for g in v1.groups if g.name == n]
    neutral = (0.5, 0.5, 1.0, 1.0) + (0.0,) * 9
    v2 = descriptor.DescriptorLayout("v2", descriptor._contiguous(groups), neutral)
    monkeypatch.setitem(descriptor.LAYOUTS, "v2", v2)
    cond = "model.overrides.condition={source: descriptor, layout: v2, dim: 8, hidden_dim: 8}"
    err = _bad([*base, cond, "model.overrides.vision.cond_dim=8"], capsys, tmp_path / "runs")
    assert err == (
        "mmssl train: error: model condition.layout 'v2': the data pipeline writes descriptor "
        "layout 'v1', which the model would read as 'v2'\n"
    )


def test_a_key_of_a_model_file_is_named_in_the_file(
    base: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A misspelt key inside the JSON that model.name names was reported as
    'model.overrides.vision.dept', a key the recipe does not have, and the file unnamed."""
    import json

    from mmssl.models.registry import ModelFileError, model_config_dict, resolve_model_config

    cfg = model_config_dict("test_tiny_simclr")
    cfg["vision"]["dept"] = cfg["vision"].pop("depth")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    runs = tmp_path / "runs"
    err = _bad([*base, f"model.name={path}"], capsys, runs)
    assert err.startswith(
        f"mmssl train: error: model.name: {path}: unknown key 'model.vision.dept'"
    ), err
    with pytest.raises(ModelFileError, match=f"^{path}: unknown key 'model.vision.dept'"):
        resolve_model_config(str(path), embed_dim=8)  # the overrides do not touch it
    path.write_text("{not json", encoding="utf-8")  # the file's too, not "model.overrides.json"
    err = _bad([*base, f"model.name={path}"], capsys, runs)
    assert err.startswith(f"mmssl train: error: model.name: {path}: not valid JSON"), err
    # an override's own mistake is still the override's, also on a good file
    path.write_text(json.dumps(model_config_dict("test_tiny_simclr")), encoding="utf-8")
    err = _bad([*base, f"model.name={path}", "model.overrides.vision.dpth=2"], capsys, runs)
    assert "unknown key 'model.overrides.vision.dpth'" in err and str(path) not in err
    # and an override that mends the file's error is the user's word
    bad = model_config_dict("test_tiny_simclr")
    bad["vision"].update(pool="token", class_token=False)
    path.write_text(json.dumps(bad), encoding="utf-8")
    assert resolve_model_config(str(path), **{"vision.class_token": True}).vision.class_token


def test_validation_and_the_run_agree_on_the_tokenizer(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_data: str
) -> None:
    """An image-only run never reads data.tokenizer, yet the run loaded it (a misspelt one
    ended it after --validate said ok); a model with a text tower pins it for its export, and
    --validate now checks it loads."""
    recipe = {
        "name": "img",
        "out_dir": str(tmp_path / "runs"),
        "model": {"name": "test_tiny_simclr"},  # no text tower
        "data": {"sources": {"train": {"urls": "synthetic", "kind": "image"}}, "views": 2},
        "objectives": {"simclr": {"source": "train"}},
        "train": {"steps": 1, "global_batch_size": 4, "micro_batch_size": 4},
        "logging": {"every": 1, "tensorboard": False, "progress": False},
    }
    path = tmp_path / "img.yaml"
    path.write_text(json.dumps(recipe), encoding="utf-8")
    typo = "data.tokenizer=defualt"
    assert main([str(path), typo, "--validate"]) == 0
    assert main([str(path), typo]) == 0
    assert (tmp_path / "runs" / "img" / "summary.md").is_file()
    capsys.readouterr()
    text_tower = [str(path), typo, "model.name=test_tiny_clip", "name=clip"]
    err = _bad([*text_tower, "--validate"], capsys, tmp_path / "none")
    # both places a relative path is looked for: the working directory, the recipe's folder
    assert err.startswith("mmssl train: error: data.tokenizer: 'defualt' is not 'default', ")
    assert f"{Path.cwd() / 'defualt'} or {tmp_path / 'defualt'}" in err
    # and one with more ids than the tower, which evaluation would refuse of its export, on
    # real images (synthetic data has its own ids)
    shards = f"data.sources.train.urls={demo_data}/digits/train-{{000000..000014}}.tar"
    err = _bad([*text_tower[:1], *text_tower[2:], shards, "--validate"], capsys, tmp_path / "none")
    assert "data.tokenizer 'default' has 8192 ids but the model's text vocab_size is" in err


@pytest.mark.parametrize("broken", ["fastviews", "fastdraws"])
def test_backend_numba_is_refused_when_either_renderer_cannot_run(monkeypatch, broken):
    import mmssl.data.decode as decode
    from mmssl.train.recipe import DataConfig, _check_numba

    monkeypatch.setattr(
        decode, "compiled_problem", lambda name: f"{name} is broken" if name == broken else None
    )
    data = DataConfig(views=2, augment={"backend": "numba"})
    with pytest.raises(
        ConfigError, match=f"data.augment.backend: backend numba, but {broken} is broken"
    ):
        _check_numba(data)


@pytest.mark.parametrize("name", ["default", "clip"])
def test_a_named_tokenizer_that_cannot_load_says_its_own_reason(name, monkeypatch) -> None:
    """A relative path found nowhere names both places looked; "clip" without open_clip (or a
    missing shipped default) was said to be neither "default" nor "clip"."""
    import mmssl.tokenizer
    from mmssl.train.recipe import recipe_from_dict
    from mmssl.train.streams import tokenizer

    def missing(_name):
        raise FileNotFoundError(f"{_name}: its own reason")

    monkeypatch.setattr(mmssl.tokenizer, "get_tokenizer", missing)
    with pytest.raises(ConfigError, match=f"^data.tokenizer: {name}: its own reason$"):
        tokenizer(recipe_from_dict({"data": {"tokenizer": name}}))


def test_an_existing_tokenizer_folder_without_a_tokenizer_says_so(tmp_path, monkeypatch) -> None:
    """Found, it is not "found neither here nor there": get_tokenizer's own reason stands."""
    from mmssl.train.recipe import recipe_from_dict
    from mmssl.train.streams import tokenizer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok").mkdir()
    with pytest.raises(ConfigError, match="no tokenizer file"):
        tokenizer(recipe_from_dict({"data": {"tokenizer": "tok"}}))
