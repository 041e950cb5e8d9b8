"""The run record of a checkpoint (`mmssl_run.json`: the recipe, resolved model config, world
size, ZeRO stage and source seeding of the run that saved it) against a run that would resume
from it: what a resume must keep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmssl.schema import ConfigError
from mmssl.train.checkpoint import RUN_RECORD, CheckpointError

# Recipe sections a resume must keep: they shape the weights, the optimizer state or the LR
# schedule that the checkpoint holds (DeepSpeed restores the scheduler's saved fields, so a
# changed `train.steps` or `optim.lr` would be ignored, not applied)
RESUME_FIXED = (
    "model",
    "objectives",
    "optim",
    "schedule",
    "precision",
    "train.steps",
    "train.global_batch_size",
    "train.micro_batch_size",
    "train.grad_clip",
    "train.freeze",
)


def _at(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _first_difference(old: Any, new: Any, where: str) -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = _first_difference(old.get(key), new.get(key), f"{where}.{key}")
            if found:
                return found
        return None
    return None if old == new else (where, old, new)


def _read_as_now(saved: dict[str, Any]) -> dict[str, Any]:
    """The saved recipe read through this version's schema, so that a field added to mmssl
    since the checkpoint was written takes its default (by convention the behaviour before
    the field existed) instead of blocking every resume after an upgrade.  A record this
    schema cannot read (a field since removed) is compared as saved."""
    from mmssl.train.recipe import recipe_from_dict

    try:
        return json.loads(json.dumps(recipe_from_dict(saved).to_dict()))
    except ConfigError:
        return saved


def model_record(cfg: Any) -> dict[str, Any]:
    """A ModelConfig as the run record holds it: the recipe names its model by a name or a
    JSON file (`model.name`) that may be edited or deleted after training, so the record
    keeps what it resolved to.  Activation checkpointing is a training-time switch
    (`train.activation_checkpointing`, free on a resume), not part of the model."""
    from mmssl.schema import to_dict

    data = json.loads(json.dumps(to_dict(cfg)))  # as saved: tuples become lists
    for tower in ("vision", "text"):
        if isinstance(data.get(tower), dict):
            data[tower]["grad_checkpointing"] = False
    return data


def recorded_model(saved: dict[str, Any], where: str) -> Any:
    """The ModelConfig of a run record's `model` (as `model_record` wrote it), checked as a
    file's would be; CheckpointError naming `where` if it cannot be read."""
    from mmssl.models.config import ModelConfig
    from mmssl.models.io import check_model_config
    from mmssl.schema import from_dict

    try:
        cfg = from_dict(ModelConfig, saved, "model")
        check_model_config(cfg, "model")
    except (ConfigError, ValueError, TypeError) as err:
        raise CheckpointError(f"{where}: the recorded model is unusable ({err})") from None
    return cfg


def record(
    recipe: dict[str, Any],
    world_size: int,
    zero_stage: int,
    model: Any = None,
    tokenizer: dict[str, Any] | None = None,
    origin: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run record a checkpoint is saved with (`checkpoint.save` writes it on rank 0);
    `model` is the ModelConfig the run built (None: the recipe's, resolved now); `tokenizer`
    the metadata of the tokenizer it reads text with, as it was when the run started
    (`streams.tokenizer_record`; None for a model without a text tower); `origin` the
    checkpoint of another run it started from (`checkpoint.started_from`), kept by every
    checkpoint of its line (None: it started at step 0)."""
    from mmssl.data.pipeline import STATE_VERSION
    from mmssl.train.streams import SOURCE_SEEDING

    if model is None:
        from mmssl.train.recipe import model_config, recipe_from_dict

        model = model_config(recipe_from_dict(recipe))
    return {
        "recipe": recipe,
        "model": model_record(model),
        "world_size": world_size,
        "zero_stage": zero_stage,
        "source_seeding": SOURCE_SEEDING,
        "data_state": STATE_VERSION,
        **({"tokenizer": tokenizer} if tokenizer is not None else {}),
        **({"started_from": origin} if origin is not None else {}),
    }


def read_started_from(folder: Path) -> dict[str, Any] | None:
    """The `started_from` of checkpoint `folder`'s run record, None without one."""
    try:
        start = json.loads((folder / RUN_RECORD).read_text(encoding="utf-8")).get("started_from")
    except (OSError, ValueError, AttributeError):
        return None
    return start if isinstance(start, dict) and "checkpoint" in start else None


def _shard_sources(recipe: dict[str, Any]) -> list[str]:
    """The sources the objectives of `recipe` read that stream shards (not `synthetic`)."""
    data = recipe.get("data") or {}
    sources = data.get("sources") or {}
    used = {o.get("source", "train") for o in (recipe.get("objectives") or {}).values()}
    return [n for n, s in sources.items() if n in used and (s or {}).get("urls") != "synthetic"]


def _loader_workers(recipe: dict[str, Any]) -> int | None:
    """The loader workers whose positions a checkpoint of `recipe` holds, per rank (the
    pipeline runs `data.workers` 0 as one logical worker); None when no source the
    objectives read has a loader (synthetic data keeps a plain index)."""
    if not _shard_sources(recipe):
        return None
    return max(1, int((recipe.get("data") or {}).get("workers") or 0))


def _refuse_changes(
    folder: Path, saved: dict[str, Any], recipe: dict[str, Any], keys: Any, why: str
) -> None:
    """ConfigError naming the first of `keys` (dotted) whose value differs from the record's."""
    for key in keys:
        found = _first_difference(_at(saved, key), _at(recipe, key), key)
        if found:
            where, was, now = found
            raise ConfigError(
                f"{where} is {now!r} but checkpoint {folder} was trained with {was!r}; {why}"
            )


def check_resume(folder: Path, recipe: dict[str, Any], world_size: int, zero_stage: int) -> None:
    """Before anything is loaded or written: the checkpoint's run record (saved beside it)
    against this run.  A ConfigError names what differs; checkpoints saved before the record
    existed are not checked here (`load` still checks the world size)."""
    path = folder / RUN_RECORD
    if not path.is_file():
        return
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
        saved, saved_world, saved_stage = run["recipe"], run["world_size"], run["zero_stage"]
        # records written before the field existed: every source was seeded with data.seed
        seeding = int(run.get("source_seeding", 1))
        data_state = int(run.get("data_state", 3))  # older records: version 3 or before
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {folder}: {RUN_RECORD} is unreadable ({err})") from None
    saved_model = run.get("model")  # None in records written before it was kept
    if saved_world != world_size:
        # `mmssl export` reads RUN/checkpoints/TAG; a resume may name a tag folder elsewhere
        run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else "RUN"
        where = (
            "" if run_dir != "RUN" else f", with {folder} copied to RUN/checkpoints/{folder.name}"
        )
        raise ConfigError(
            f"checkpoint {folder} was written by {saved_world} ranks, this run has "
            f"{world_size}: the data positions and optimizer partitions cannot be mapped "
            f"(to go on from its weights on {world_size}: `mmssl export {run_dir} --tag "
            f"{folder.name}`{where}, then a new run with train.init_from=<that export>; its "
            "optimizer state and data positions start afresh)"
        )
    if saved_stage != zero_stage:
        raise ConfigError(
            f"checkpoint {folder} was written at ZeRO stage {saved_stage}, this run uses "
            f"stage {zero_stage}: DeepSpeed cannot load one stage's optimizer state in another"
        )
    recipe = json.loads(json.dumps(recipe))  # as saved: tuples become lists
    saved = _read_as_now(saved)
    _refuse_changes(
        folder,
        saved,
        recipe,
        RESUME_FIXED,
        f"a resume, from this run's checkpoint or another's, keeps {', '.join(RESUME_FIXED)}: "
        "change them in a run from step 0 (another name, no checkpoint.resume)",
    )
    # what the saved data positions depend on, named by its key before anything is loaded
    # (the data state's own check comes after DeepSpeed's load and names no recipe key)
    shards = _shard_sources(saved)
    fields = ("kind", "mode", "shuffle", "epoch_batches")
    _refuse_changes(
        folder,
        saved,
        recipe,
        (["data.seed"] if shards else [])
        + [f"data.sources.{name}.{field}" for name in shards for field in fields],
        "the saved data positions are positions in that stream, so a resume keeps it: "
        "restore it, or change it in a run from step 0 (another name)",
    )
    if saved_model is not None:
        _check_model(folder, saved_model, recipe)
    # the data positions are saved per loader worker: checked here, before DeepSpeed loads
    # the checkpoint, rather than by the data state once everything else is loaded
    was, now = _loader_workers(saved), _loader_workers(recipe)
    if was is not None and now is not None and was != now:
        old, new = _at(saved, "data.workers"), _at(recipe, "data.workers")
        raise ConfigError(
            f"data.workers is {new!r} but checkpoint {folder} was trained with {old!r}; the "
            f"saved data positions are per loader worker, so a resume keeps data.workers "
            f"(0 and 1 are both one worker)"
        )
    _check_seeding(folder, saved, seeding)
    _check_first_source(folder, saved, recipe)
    _check_view_draws(folder, saved, data_state)
    _check_lm_rows(folder, saved, data_state)
    _check_tokenizer(folder, run.get("tokenizer"), recipe)


def _check_tokenizer(folder: Path, pinned: Any, recipe: dict[str, Any]) -> None:
    """Refuse a resume whose `data.tokenizer` is not the file the checkpoint trained with
    (retrained in place, or another path): the same text would become other ids.  Records
    written before runs pinned their tokenizer are not checked."""
    if not isinstance(pinned, dict) or "sha256" not in pinned:
        return
    from mmssl.train.recipe import recipe_from_dict
    from mmssl.train.streams import tokenizer_name, tokenizer_record

    name = tokenizer_name(recipe_from_dict(recipe))
    now = tokenizer_record(name)
    if now is None or now.get("sha256") != pinned["sha256"]:
        found = "does not load" if now is None else f"has sha256 {now.get('sha256')}"
        raise ConfigError(
            f"data.tokenizer {name!r} {found} but checkpoint {folder} was trained with "
            f"{pinned.get('name')!r} (sha256 {pinned['sha256']}); a resume keeps the "
            f"tokenizer: restore that file, or train a new run (another name)"
        )


def _check_model(folder: Path, saved: Any, recipe: dict[str, Any]) -> None:
    """Refuse a resume whose model resolves otherwise than the checkpoint's, its recipe's
    `model` section unchanged: the JSON file `model.name` names was edited since (a changed
    activation would resume silently with it, a changed width failed in DeepSpeed's load)."""
    from mmssl.train.recipe import model_config, recipe_from_dict

    # read through this version's ModelConfig, so that a field added since takes its
    # default; one it cannot read (a field since removed) is compared as saved
    try:
        was = model_record(recorded_model(saved, f"checkpoint {folder}: {RUN_RECORD}"))
    except CheckpointError:
        was = saved
    now = model_record(model_config(recipe_from_dict(recipe)))
    found = _first_difference(was, now, "model")
    if found:
        key, old, new = found
        raise ConfigError(
            f"{key} is {new!r} but checkpoint {folder} was trained with {old!r}: the model "
            f"{_at(recipe, 'model.name')!r} resolves otherwise than when it was saved (its "
            f"config file edited?); a resume keeps the model: restore it, or train a new run "
            f"(another name)"
        )


def _check_first_source(folder: Path, saved: dict[str, Any], recipe: dict[str, Any]) -> None:
    """Refuse a resume whose first shard source (in `data.sources` order) is another one
    than the checkpoint's: that source streams with `data.seed` and every later one with a
    seed of its name (`streams.source_seeds`), so reordering the sources gives two of them
    other seeds, and their saved positions are no continuation of the new streams.  (The
    objectives, which a resume keeps, fix the names.)"""
    was, now = _shard_sources(saved), _shard_sources(recipe)
    if not was or not now or was[0] == now[0]:
        return
    raise ConfigError(
        f"data.sources lists {', '.join(now)} (the shard sources the objectives read) but "
        f"checkpoint {folder} was trained with {', '.join(was)}; the first of them streams "
        f"with data.seed and each later one with a seed of its name, so a resume keeps "
        f"{was[0]!r} first in data.sources"
    )


def _check_seeding(folder: Path, saved: dict[str, Any], seeding: int) -> None:
    """Refuse a checkpoint whose sources were seeded otherwise than this version seeds them
    (`streams.source_seeds`): its saved data positions are positions in other streams.
    Seeding 1 -> 2 changed only the sources after the first, so a run with one shard source
    resumes; with several it would go on with different shard draws for those (and their
    saved positions, which the data state ties to the seed, would not load)."""
    from mmssl.train.streams import SOURCE_SEEDING

    shards = _shard_sources(saved)
    if seeding == SOURCE_SEEDING or len(shards) < 2:
        return
    raise ConfigError(
        f"checkpoint {folder} was saved by an mmssl that seeded every data source with "
        f"data.seed (source seeding {seeding}), so its sources {', '.join(shards)} drew their "
        f"shards in lockstep; this version seeds each source after the first from data.seed "
        f"and its name (source seeding {SOURCE_SEEDING}), so the saved data positions of "
        f"{', '.join(shards[1:])} are no continuation of their streams.  Resume it with the "
        f"mmssl version that saved it, or start a new run (another name, or "
        f"checkpoint.resume=none after moving this run's checkpoints away)"
    )


def _check_lm_rows(folder: Path, saved: dict[str, Any], data_state: int) -> None:
    """Refuse, before anything loads, a checkpoint whose data state predates version 5 (LM
    rows one token shorter, their last position untrained) when the run read a text source:
    its saved positions would go on with rows cut otherwise (the data state refuses it too,
    after DeepSpeed has loaded the checkpoint)."""
    sources = (saved.get("data") or {}).get("sources") or {}
    text = [n for n in _shard_sources(saved) if (sources[n] or {}).get("kind") == "text"]
    if data_state >= 5 or not text:
        return
    raise ConfigError(
        f"checkpoint {folder} was saved with data state version {data_state}, whose LM rows "
        f"were one token shorter than the context (its last position never trained); this "
        f"version packs context_length + 1 tokens a row, so the saved positions of "
        f"{', '.join(text)} would go on with rows cut otherwise.  Resume it with the mmssl "
        f"version that saved it, or start a new run (another name, or checkpoint.resume=none "
        f"after moving this run's checkpoints away)"
    )


def _check_view_draws(folder: Path, saved: dict[str, Any], data_state: int) -> None:
    """Refuse, before anything loads, a checkpoint whose data state predates version 4 of
    the pipeline (a batch's view parameters from one generator call) when its run drew
    augmented views: its saved positions would go on with other views.  The data state's
    own check (`StreamLoader.load_state_dict`) refuses it too, but only after DeepSpeed
    has loaded the checkpoint."""
    if data_state >= 4:
        return
    data = saved.get("data") or {}
    sources = data.get("sources") or {}
    images = [n for n in _shard_sources(saved) if (sources[n] or {}).get("kind") != "text"]
    if not int(data.get("views") or 0) or not images:
        return
    raise ConfigError(
        f"checkpoint {folder} was saved with data state version {data_state}, which drew "
        f"every view parameter with a generator call of its own; this version draws a "
        f"batch's in one call, so the saved positions of {', '.join(images)} would go on with "
        f"other augmented views than the run that saved it.  Resume it with the mmssl "
        f"version that saved it, or start a new run (another name, or checkpoint.resume=none "
        f"after moving this run's checkpoints away)"
    )
