"""Bad arguments fail up front with one line naming them: augmentation strengths, image
normalisation, pipeline sizes, shard writing with no input, all-unreadable epoch sources."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from data_helpers import StubTokenizer

from mmssl.data.augment import AugmentConfig
from mmssl.data.errors import DataError
from mmssl.data.pipeline import Source, build_pipeline
from mmssl.schema import ConfigError, from_dict

QUICK = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"

# (field, bad value): each passed unchecked before, and broke a worker later or did nothing
BAD_AUGMENT = [
    ("brightness", -3.0),
    ("contrast", math.inf),
    ("saturation", -0.1),
    ("ratio", (2.0, 1.0)),
    ("ratio", (0.0, 1.0)),
    ("blur_sigma", (3.0, 1.0)),
    ("blur_sigma", (-1.0, 1.0)),
    ("scale", (0.5,)),
    ("ratio", (0.5, 1.0, 2.0)),
    ("flip_p", 5.0),
    ("jitter_p", -1.0),
    ("grayscale_p", 1.5),
    ("blur_p", math.nan),
    ("solarize_p", 2.0),
    ("solarize_threshold", 3.0),
]


@pytest.mark.parametrize(("field", "value"), BAD_AUGMENT)
def test_augment_config_range_checks_every_field(field, value):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**{field: value})
    # the recipe / --augment path: lists from YAML, a one-line ConfigError with the key
    plain = list(value) if isinstance(value, tuple) else value
    with pytest.raises(ConfigError, match=f"data.augment: {field}"):
        from_dict(AugmentConfig, {field: plain}, "data.augment")


def test_augment_config_accepts_the_edges():
    AugmentConfig(brightness=0.0, hue=0.5, flip_p=1.0, jitter_p=0.0, blur_sigma=(0.0, 0.0))
    AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), solarize_threshold=0.0)


@pytest.mark.parametrize("weight", [math.nan, math.inf, -1.0, 0.0, "2", None])
def test_source_weight_that_is_not_a_number_above_0_is_refused(image_shards, weight):
    # nan used to pass: the source was then silently never drawn in resampled mode
    sources = [Source(image_shards, name="a"), Source(image_shards, name="b", weight=weight)]
    with pytest.raises(DataError, match=r"source b weight must be a finite number > 0"):
        build_pipeline(sources=sources, batch_size=4, rank=0, world_size=1, image_size=8)


def _validate(*overrides: str) -> None:
    from mmssl.train.recipe import load_recipe, validate

    validate(load_recipe(QUICK, list(overrides)), world_size=1, check_files=False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # quickstart has data.view_augment: the error names data.augment, where the value is
        (["data.augment.brightness=-3"], r"data\.augment: brightness"),
        (["data.augment.ratio=[2, 1]"], r"data\.augment: ratio must have min <= max"),
        (["data.augment.flip_p=5"], r"data\.augment: flip_p"),
        (["data.view_augment=[{}, {jitter_p: -1}]"], r"data\.view_augment\[1\]: jitter_p"),
        (["data.std=[0.2, 0.2, 0.2]"], r"data\.std needs data\.mean"),
        (["data.mean=[0.5, 0.5, 0.5]"], r"data\.mean needs data\.std"),
        (["data.mean=[0.5, 0.5, 0.5]", "data.std=[0, 0, 0]"], r"data\.std must be > 0"),
        (["data.mean=[0.5]", "data.std=[0.2]"], r"data\.mean must be 3 finite numbers"),
    ],
)
def test_recipe_validation_names_the_bad_data_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _validate(*overrides)


def test_recipe_with_mean_and_std_validates():
    _validate("data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": -8}, "image_size"),
        ({"image_size": 1}, "image_size must be an integer >= 2"),  # its blur crashed a worker
        ({"num_views": -1}, "num_views"),
        ({"seed": -1}, "seed"),
        ({"mean": (0.5,), "std": (0.2,)}, "mean must be 3"),
        ({"std": (0.2, 0.2, 0.2)}, "std needs mean"),
        ({"mean": (0.5, 0.5, 0.5)}, "mean needs std"),
        ({"mean": (0.5, 0.5, 0.5), "std": (0.0, 0.2, 0.2)}, "std must be > 0"),
        ({"mean": (0.5, math.nan, 0.5), "std": (0.2, 0.2, 0.2)}, "mean must be 3 finite"),
        ({"mean": (124.0, 116.0, 104.0), "std": (58.0, 57.0, 57.0)}, r"mean must be in \[0, 1\]"),
        ({"mean": (0.5, 0.5, 0.5), "std": (58.0, 57.0, 57.0)}, "std must be at most 1"),
        ({"num_views": 1, "augment": (AugmentConfig(), AugmentConfig())}, "2 augment configs"),
    ],
)
def test_build_pipeline_rejects_bad_arguments(image_shards, kwargs, message):
    args = dict(batch_size=4, rank=0, world_size=1, image_size=8, num_views=1)
    with pytest.raises(DataError, match=message):
        build_pipeline(image_shards, **{**args, **kwargs})


def test_build_pipeline_normalises_with_mean_and_std(image_shards):
    common = dict(batch_size=4, rank=0, world_size=1, image_size=8, num_views=0, shuffle=1)
    plain = next(iter(build_pipeline(image_shards, **common)))["image"]
    pl = build_pipeline(image_shards, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **common)
    normed = next(iter(pl))["image"]
    assert normed.sub(plain.sub(0.5).div(0.25)).abs().max() < 1e-5


def test_write_shards_without_samples_creates_nothing(tmp_path):
    from mmssl.data.shard_inputs import samples_from_folder
    from mmssl.data.shards import write_shards

    out = tmp_path / "out"
    with pytest.raises(DataError, match="no samples"):
        write_shards(iter([]), str(out), progress=False)
    assert not out.exists()
    with pytest.raises(DataError, match="does not exist"):
        write_shards(samples_from_folder(str(tmp_path / "missing")), str(out), progress=False)
    assert not out.exists()


def test_shards_cli_with_missing_input_writes_and_draws_nothing(tmp_path, capsys):
    from mmssl.data.shards import main

    out = tmp_path / "out"
    assert main(["folder", str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"mmssl shards: error: image folder {str(tmp_path / 'missing')!r} does not exist"
    ]
    assert not out.exists()


def _garbage(tmp_path, n: int) -> list[str]:
    """n unreadable shards: half garbage bytes, half empty files."""
    urls = []
    for i in range(n):
        path = tmp_path / f"bad-{i}.tar"
        path.write_bytes(os.urandom(8) if i % 2 == 0 else b"")
        urls.append(str(path))
    return urls


def test_epoch_source_of_unreadable_shards_says_they_were_skipped(tmp_path):
    urls = _garbage(tmp_path, 4)
    with pytest.raises(DataError, match=r"0 samples readable.*skipped as bad: bad_tar: 2") as e:
        build_pipeline(urls, batch_size=4, mode="epoch", rank=0, world_size=1)
    assert "lower batch_size" not in str(e.value)
    assert "empty_shard: 2" in str(e.value)


def test_every_sample_bad_names_the_damage_counting_found_too(tmp_path):
    # a shard of undecodable images beside a garbage and an empty shard: the error listed
    # the stream's bad_image only, not the two shards that counting the samples had skipped
    import io
    import tarfile

    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tf:
        for i in range(3):
            for ext, data in (("jpg", b"not a jpeg"), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    urls = [str(bad), *_garbage(tmp_path, 2)]
    loader = build_pipeline(
        urls, batch_size=2, mode="epoch", shuffle=2, image_size=8, num_views=0, rank=0,
        world_size=1,
    )  # fmt: skip
    with pytest.raises(DataError, match="every sample is bad") as e:
        next(iter(loader))
    assert str(e.value).endswith(
        "skipped: {'bad_image': 3}; skipped while counting the shards: "
        "{'bad_tar': 1, 'empty_shard': 1}"
    )


def test_epoch_text_source_of_unreadable_shards_says_they_were_skipped(tmp_path):
    src = Source(tuple(_garbage(tmp_path, 2)), kind="text", name="lm")
    with pytest.raises(DataError, match=r"source lm has 0 packed rows.*skipped as bad"):
        build_pipeline(
            sources=[src],
            batch_size=2,
            mode="epoch",
            rank=0,
            world_size=1,
            tokenizer=StubTokenizer(),
            context_length=8,
        )


@pytest.mark.parametrize(
    "manifest",
    [
        "{not json",
        "[]",
        '{"shards": {"train-000000.tar": 6}}',
        '{"shards": [{"url": "train-000000.tar"}]}',  # another tool's manifest.json
        '{"shards": [{"url": "train-000000.tar", "count": "6"}]}',
        '{"shards": [{"url": "train-000000.tar", "count": -6}]}',  # a wrong epoch length
    ],
)
def test_epoch_mode_with_a_damaged_manifest_names_it(tmp_path, manifest):
    # it raised JSONDecodeError, KeyError or AttributeError without a path (a traceback from
    # mmssl train), or took a negative count into the epoch's length
    from data_helpers import write_image_shards

    pattern = write_image_shards(str(tmp_path), shards=2, per_shard=6)
    (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(DataError, match=r"manifest.json is not a shard manifest"):
        build_pipeline(pattern, batch_size=2, mode="epoch", rank=0, world_size=1)
    (tmp_path / "manifest.json").unlink()  # without one the shards are counted: 12 samples
    assert len(build_pipeline(pattern, batch_size=2, mode="epoch", rank=0, world_size=1)) == 6


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/s-{000000..000001}.tar", "s3://b/x.tar"])
def test_a_url_only_a_command_can_read_is_a_preflight_error(tmp_path, url):
    # the reader opens local files and pipe: commands; an http:// shard was opened as a
    # file name, so a run started and then found every shard "missing"
    with pytest.raises(DataError, match=r"only local paths and pipe: .*'pipe:curl -sfL "):
        build_pipeline(url, batch_size=2, rank=0, world_size=1)
    with pytest.raises(DataError, match=r"only local paths and pipe:"):
        build_pipeline(
            [str(tmp_path / "local.tar"), url], batch_size=2, rank=0, world_size=1, mode="epoch"
        )


def test_a_shard_listed_twice_is_refused_where_each_is_read_once(image_shards, tmp_path):
    """An epoch read a repeated shard's samples twice (an evaluation counted them twice),
    unwarned.  Resampled mode draws from the list: a repeat weights the shard there."""
    from mmssl.data.urls import expand_urls
    from mmssl.eval.data import shard_urls

    urls = expand_urls(image_shards)
    same = os.path.join(os.path.dirname(urls[0]), ".", os.path.basename(urls[0]))
    for twice in ([*urls, urls[0]], [*urls, same], ["pipe:cat x.tar", "pipe:cat x.tar"]):
        with pytest.raises(DataError, match="lists a shard twice"):
            build_pipeline(twice, batch_size=2, rank=0, world_size=1, mode="epoch")
    with pytest.raises(DataError, match="lists a shard twice"):
        shard_urls([*urls, same])
    link = tmp_path / "link.tar"  # the same file under another name
    link.symlink_to(urls[0])
    with pytest.raises(DataError, match="lists a shard twice"):
        shard_urls([*urls, str(link)])
    assert len(build_pipeline(urls, batch_size=2, rank=0, world_size=1, mode="epoch")) == 24
    build_pipeline([*urls, urls[0]], batch_size=2, rank=0, world_size=1, mode="resampled")


@pytest.mark.parametrize("kept", [2, 10])  # fewer samples than the manifest says, and more
def test_a_shard_rewritten_since_its_manifest_is_counted_by_reading_it(tmp_path, caplog, kept):
    """The manifest's count of a shard rewritten since (its size is not the recorded
    `bytes`) made an epoch repeat samples (or drop them), silently; now the shard is counted
    by reading it, with a warning, and every sample comes once."""
    import logging

    import numpy as np
    from data_helpers import png_bytes, write_image_shards

    from mmssl.data.shards import ShardWriter

    pattern = write_image_shards(str(tmp_path), shards=2, per_shard=6)
    manifest = (tmp_path / "manifest.json").read_text()
    w = ShardWriter(str(tmp_path / "new"), "train", max_count=100)
    for i in range(kept):
        w.write(
            {"__key__": f"r{i:03d}", "png": png_bytes(np.zeros((8, 8, 3), np.uint8)), "txt": "r"}
        )
    w.close()
    os.replace(tmp_path / "new" / "train-000000.tar", tmp_path / "train-000000.tar")
    (tmp_path / "manifest.json").write_text(manifest)  # the old counts: 6 and 6
    want = {f"r{i:03d}" for i in range(kept)} | {f"s{i:05d}" for i in range(6, 12)}
    with caplog.at_level(logging.WARNING, logger="mmssl.data"):
        pl = build_pipeline(
            pattern, batch_size=1, mode="epoch", rank=0, world_size=1, image_size=8,
            num_views=0, shuffle=1,
        )  # fmt: skip
        keys = [k for b in pl for k in b["__key__"]]
    assert sorted(keys) == sorted(want)
    assert (
        "train-000000.tar is " in caplog.text and "counting its samples by reading" in caplog.text
    )


def test_mean_and_std_apply_per_channel_in_rgb_order(image_shards: str) -> None:
    """data.mean / data.std normalise channel c with mean[c] and std[c] (the test above uses
    one value for all three channels, which a reversed table passes)."""
    import torch

    from mmssl.data.pipeline import build_pipeline

    common = dict(batch_size=4, rank=0, world_size=1, image_size=8, num_views=0, shuffle=1)
    plain = next(iter(build_pipeline(image_shards, **common)))["image"]
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    normed = next(iter(build_pipeline(image_shards, mean=mean, std=std, **common)))["image"]
    want = (plain - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert (normed - want).abs().max() < 1e-5
