"""The run record check of a resume (`run_record.check_resume`) across mmssl versions."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from mmssl.schema import ConfigError
from mmssl.train.checkpoint import RUN_RECORD
from mmssl.train.recipe import recipe_from_dict
from mmssl.train.run_record import check_resume


def _record(folder: Path, recipe: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"recipe": recipe, "world_size": 1, "zero_stage": 0}
    (folder / RUN_RECORD).write_text(json.dumps(record))
    return folder


def _resolved(**sections) -> dict:
    return json.loads(json.dumps(recipe_from_dict(sections).to_dict()))


def test_resume_accepts_a_field_added_since_the_checkpoint(tmp_path: Path) -> None:
    """A record written before a field existed (here: one deleted from each fixed section's
    record) resumes when this run keeps the field's default, and is refused, naming the
    field, when it does not."""
    now = _resolved(optim={"lr": 1e-3}, train={"steps": 10})
    for section, key in [
        ("optim", "weight_decay"),
        ("schedule", "warmup_steps"),
        ("train", "grad_clip"),
    ]:
        old = copy.deepcopy(now)
        del old[section][key]
        folder = _record(tmp_path / f"{section}-{key}", old)
        check_resume(folder, now, 1, 0)  # the default: accepted
        changed = copy.deepcopy(now)
        changed[section][key] = 0.123
        with pytest.raises(ConfigError, match=f"{section}.{key} is 0.123"):
            check_resume(folder, changed, 1, 0)


def test_resume_refuses_a_changed_fixed_field(tmp_path: Path) -> None:
    """The check itself still holds: a fixed field changed against the record is refused."""
    now = _resolved(optim={"lr": 1e-3})
    folder = _record(tmp_path / "c", now)
    check_resume(folder, now, 1, 0)
    changed = copy.deepcopy(now)
    changed["optim"]["lr"] = 2e-3
    with pytest.raises(ConfigError, match="optim.lr is 0.002 but checkpoint"):
        check_resume(folder, changed, 1, 0)


def test_resume_compares_a_record_with_a_removed_field_as_saved(tmp_path: Path) -> None:
    """A record holding a key this version does not know cannot be read through the schema;
    it is compared as saved, so the unknown key is named."""
    now = _resolved()
    old = copy.deepcopy(now)
    old["optim"]["retired_knob"] = 1
    folder = _record(tmp_path / "r", old)
    with pytest.raises(ConfigError, match="optim.retired_knob"):
        check_resume(folder, now, 1, 0)


def _loader_recipe(workers: int) -> dict:
    return _resolved(data={"sources": {"train": {"urls": "shards/{0..3}.tar"}}, "workers": workers})


def test_resume_refuses_changed_data_workers_naming_the_recipe_key(tmp_path: Path) -> None:
    """The data positions are saved per loader worker: a changed `data.workers` is refused
    from the run record, before DeepSpeed loads anything, naming the recipe key (not the
    pipeline's `num_workers`)."""
    folder = _record(tmp_path / "w", _loader_recipe(2))
    check_resume(folder, _loader_recipe(2), 1, 0)
    with pytest.raises(ConfigError, match=r"data\.workers is 3 but checkpoint .* with 2"):
        check_resume(folder, _loader_recipe(3), 1, 0)
    with pytest.raises(ConfigError, match=r"data\.workers is 0 but"):
        check_resume(folder, _loader_recipe(0), 1, 0)


def test_resume_data_workers_zero_and_one_are_the_same_loader(tmp_path: Path) -> None:
    """The pipeline runs 0 workers as one logical worker, and synthetic data keeps no
    per-worker position: neither change is refused."""
    folder = _record(tmp_path / "one", _loader_recipe(0))
    check_resume(folder, _loader_recipe(1), 1, 0)
    synthetic = {"train": {"urls": "synthetic"}}
    folder = _record(tmp_path / "s", _resolved(data={"sources": synthetic}))
    check_resume(folder, _resolved(data={"sources": synthetic, "workers": 4}), 1, 0)


def _two_sources(**data: object) -> dict:
    """CLIP and SimCLR over the same shards under two source names."""
    sources = {"a": {"urls": "shards/{0..3}.tar"}, "b": {"urls": "shards/{0..3}.tar"}}
    return _resolved(
        data={"sources": sources, **data},
        objectives={"clip": {"source": "a"}, "simclr": {"source": "b"}},
    )


def test_resume_refuses_a_multi_source_record_of_the_old_source_seeding(tmp_path: Path) -> None:
    """A record without `source_seeding` was saved when every source was seeded with
    data.seed; with several shard sources its data positions belong to other streams than
    this version draws: refused, saying why and what to do.  Under this seeding it resumes."""
    now = _two_sources()
    folder = _record(tmp_path / "old", now)  # no source_seeding: the old seeding
    with pytest.raises(ConfigError, match="seeded every data source with data.seed") as err:
        check_resume(folder, now, 1, 0)
    assert "a, b" in str(err.value) and "start a new run" in str(err.value)
    assert "mmssl version that saved it" in str(err.value)

    from mmssl.train.run_record import record
    from mmssl.train.streams import SOURCE_SEEDING

    current = tmp_path / "new"
    current.mkdir()
    (current / RUN_RECORD).write_text(json.dumps(record(now, 1, 0)))
    assert json.loads((current / RUN_RECORD).read_text())["source_seeding"] == SOURCE_SEEDING
    check_resume(current, now, 1, 0)


def test_resume_keeps_single_source_and_synthetic_records_of_the_old_seeding(
    tmp_path: Path,
) -> None:
    """The old seeding gave the first shard source data.seed, as this one does: a record
    of one shard source (or of synthetic ones) without `source_seeding` resumes."""
    folder = _record(tmp_path / "one", _loader_recipe(1))
    check_resume(folder, _loader_recipe(1), 1, 0)
    synthetic = {"a": {"urls": "synthetic"}, "b": {"urls": "synthetic"}}
    both = {"clip": {"source": "a"}, "simclr": {"source": "b"}}
    mixed = _resolved(data={"sources": synthetic}, objectives=both)
    check_resume(_record(tmp_path / "syn", mixed), mixed, 1, 0)


def test_resume_refuses_views_drawn_before_data_state_4_before_anything_loads(
    tmp_path: Path,
) -> None:
    """A record without `data_state` (version 3 or before) of a run that drew views from
    images is refused by the run record, naming the version and the sources, before
    DeepSpeed would load anything; without views it resumes (text sources: see the next
    test), and so does a record of this version."""
    views = _resolved(data={"sources": {"train": {"urls": "shards/{0..3}.tar"}}, "views": 2})
    old = _record(tmp_path / "views", views)  # no data_state: version 3 or before
    with pytest.raises(ConfigError, match="data state version 3") as err:
        check_resume(old, views, 1, 0)
    assert "train" in str(err.value) and "start a new run" in str(err.value)
    check_resume(_record(tmp_path / "noviews", _loader_recipe(0)), _loader_recipe(0), 1, 0)

    from mmssl.data.pipeline import STATE_VERSION
    from mmssl.train.run_record import record

    current = tmp_path / "new"
    current.mkdir()
    (current / RUN_RECORD).write_text(json.dumps(record(views, 1, 0)))
    assert json.loads((current / RUN_RECORD).read_text())["data_state"] == STATE_VERSION
    check_resume(current, views, 1, 0)


def test_resume_refuses_lm_rows_packed_before_data_state_5_before_anything_loads(
    tmp_path: Path,
) -> None:
    """Data states before 5 trained LM rows one token shorter than the context (its last
    position never had a target): a run with a text source is refused by the run record,
    naming the sources; one of images only resumes."""
    text = _resolved(
        data={"sources": {"t": {"urls": "shards/{0..3}.tar", "kind": "text"}}},
        objectives={"next_token": {"source": "t"}},
    )
    for version in (None, 4):
        old = _record(tmp_path / f"text{version}", text)
        if version is not None:
            run = json.loads((old / RUN_RECORD).read_text())
            (old / RUN_RECORD).write_text(json.dumps({**run, "data_state": version}))
        with pytest.raises(ConfigError, match="LM rows were one token shorter") as err:
            check_resume(old, text, 1, 0)
        assert "saved positions of t " in str(err.value) and "start a new run" in str(err.value)
    images = _loader_recipe(0)
    old = _record(tmp_path / "images", images)
    (old / RUN_RECORD).write_text(
        json.dumps({**json.loads((old / RUN_RECORD).read_text()), "data_state": 4})
    )
    check_resume(old, images, 1, 0)


def test_resume_refuses_reordered_sources_naming_the_first(tmp_path: Path) -> None:
    """The first shard source streams with data.seed, the others with seeds of their names:
    swapping them in data.sources changes both streams, so a resume says so before anything
    loads (rather than failing later on a data state whose seed does not match)."""
    from mmssl.train.run_record import record

    saved = _two_sources()
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / RUN_RECORD).write_text(json.dumps(record(saved, 1, 0)))
    swapped = copy.deepcopy(saved)
    swapped["data"]["sources"] = dict(reversed(list(saved["data"]["sources"].items())))
    with pytest.raises(ConfigError, match="data.sources lists b, a") as err:
        check_resume(folder, swapped, 1, 0)
    assert "trained with a, b" in str(err.value) and "keeps 'a' first" in str(err.value)
    check_resume(folder, copy.deepcopy(saved), 1, 0)
    # a source no objective reads takes no part: the first shard source is still `a`
    ahead = copy.deepcopy(saved)
    ahead["data"]["sources"] = {"s": {"urls": "synthetic"}, **saved["data"]["sources"]}
    check_resume(folder, ahead, 1, 0)


def test_resume_refuses_changed_data_stream_settings_naming_the_recipe_key(tmp_path: Path) -> None:
    """data.seed or a source's shuffle changed on a resume was refused by the data state,
    after DeepSpeed had loaded the checkpoint, as "data state was saved with seed=0": now
    from the run record first, naming the key.  Synthetic data has no saved stream."""
    saved = _resolved(data={"sources": {"train": {"urls": "shards/{0..3}.tar"}}})
    folder = _record(tmp_path / "d", saved)
    check_resume(folder, saved, 1, 0)
    for key, value in [("seed", 7), ("sources.train.shuffle", 64), ("sources.train.mode", "epoch")]:
        changed = copy.deepcopy(saved)
        *path, last = key.split(".")
        node = changed["data"]
        for part in path:
            node = node[part]
        node[last] = value
        with pytest.raises(ConfigError, match=rf"data\.{key} is {value!r} but checkpoint"):
            check_resume(folder, changed, 1, 0)
    synthetic = _resolved(data={"sources": {"train": {"urls": "synthetic"}}})
    folder = _record(tmp_path / "s", synthetic)
    check_resume(
        folder, _resolved(data={"sources": {"train": {"urls": "synthetic"}}, "seed": 3}), 1, 0
    )


def test_a_run_grew_from_the_named_checkpoint_only_while_it_is_the_same_one(
    tmp_path: Path,
) -> None:
    """`find_resume`'s requeue test (`_grew_from`): this run's checkpoint grew from the one
    `resume=` names while that path holds the same checkpoint (its manifest's digest), or
    none (rotated away); a different checkpoint at the path is a new starting point."""
    from mmssl.train.checkpoint import MANIFEST, _grew_from, started_from

    origin = tmp_path / "base" / "checkpoints" / "step_00000002"
    origin.mkdir(parents=True)
    (origin / MANIFEST).write_text('{"files": {"a": 1}}')
    own = tmp_path / "fork" / "checkpoints"
    record = {"recipe": {}, "started_from": started_from(origin)}
    (own / "step_00000003").mkdir(parents=True)
    (own / "step_00000003" / RUN_RECORD).write_text(json.dumps(record))
    for named in (origin, origin.parent, origin.parent.parent):
        assert _grew_from(own, "step_00000003", str(named))
    assert not _grew_from(own, "step_00000003", str(tmp_path / "elsewhere"))
    (origin / MANIFEST).write_text('{"files": {"a": 2}}')  # the base run saved step 2 again
    assert not _grew_from(own, "step_00000003", str(origin))
    (origin / MANIFEST).unlink()  # rotated away: still the run that grew from it
    assert _grew_from(own, "step_00000003", str(origin))


def test_resume_on_another_world_size_names_the_way_to_go_on_from_the_weights(
    tmp_path: Path,
) -> None:
    """A resume cannot map 1 rank's data positions and optimizer partitions onto 2; the error
    says how to keep the weights instead: export that checkpoint (run dir and tag), then a
    warm start."""
    now = _resolved(optim={"lr": 1e-3})
    folder = _record(tmp_path / "run" / "checkpoints" / "step_00000010", now)
    with pytest.raises(ConfigError) as err:
        check_resume(folder, now, 2, 0)
    text = str(err.value)
    assert "written by 1 ranks, this run has 2" in text
    assert f"`mmssl export {tmp_path / 'run'} --tag step_00000010`" in text
    assert "train.init_from=" in text


def test_the_world_size_hint_names_a_run_only_for_a_tag_in_its_checkpoints(
    tmp_path: Path,
) -> None:
    """`mmssl export RUN --tag TAG` reads RUN/checkpoints/TAG: a resume from a tag folder kept
    elsewhere gets the copy to make first, not a run directory that holds no checkpoint."""
    now = _resolved(optim={"lr": 1e-3})
    folder = _record(tmp_path / "kept" / "step_00000010", now)
    with pytest.raises(ConfigError) as err:
        check_resume(folder, now, 2, 0)
    text = str(err.value)
    assert "`mmssl export RUN --tag step_00000010`" in text
    assert f"with {folder} copied to RUN/checkpoints/step_00000010" in text
