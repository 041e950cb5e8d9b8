"""What `mmssl.train.recipe.validate` checks of a recipe against the files it names: the
shards of every source exist and their patterns expand, epoch-mode sources have a shard for
every (rank, loader worker) slot, and the run directory can be made and written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from mmssl.schema import ConfigError

if TYPE_CHECKING:
    from mmssl.train.recipe import Recipe


def check_shards(recipe: Recipe) -> None:
    """Every local shard of every source exists (pipe: and remote URLs are not checked), and
    an epoch-mode source lists each once."""
    from mmssl.data.errors import DataError
    from mmssl.data.urls import check_no_repeats, check_urls

    for name, src in recipe.data.sources.items():
        if src.urls == "synthetic":
            continue
        try:
            urls = _source_urls(name, src.urls)
            check_urls(src.urls, urls)
            if src.mode == "epoch":
                check_no_repeats(src.urls, urls)
        except DataError as err:
            raise ConfigError(f"data.sources.{name}.urls: {err}") from None


def _source_urls(name: str, urls: str) -> list[str]:
    """Source `name`'s brace-expanded URLs; a malformed pattern is a ConfigError."""
    from mmssl.data.errors import DataError
    from mmssl.data.urls import expand_urls

    try:
        return expand_urls(urls)
    except DataError as err:  # unbalanced braces
        raise ConfigError(f"data.sources.{name}.urls: {err}") from None


def _streamed(recipe: Recipe) -> list[str]:
    """The sources a run streams: the objectives' and, with eval on, the held-out ones."""
    names = {o.source for o in recipe.objectives.values()}
    if recipe.eval.every:
        names |= set(recipe.eval.sources.values())
    return [name for name in recipe.data.sources if name in names]


def check_shard_counts(recipe: Recipe, world_size: int) -> None:
    """Every streamed source's URL pattern expands, and epoch-mode sources have a shard for
    every (rank, loader worker) slot of `world_size` ranks, as the data pipeline's pre-flight
    demands; from the URL patterns alone."""
    workers = max(1, recipe.data.workers)  # no workers: the rank itself reads, one slot
    slots = world_size * workers
    for name in _streamed(recipe):
        src = recipe.data.sources[name]
        if src.epoch_batches is not None and (src.mode != "epoch" or src.epoch_batches < 1):
            raise ConfigError(
                f"data.sources.{name}.epoch_batches must be >= 1 and needs mode=epoch, got "
                f"{src.epoch_batches} with mode={src.mode}"
            )
        if src.urls == "synthetic":
            continue
        shards = len(_source_urls(name, src.urls))
        if src.mode == "epoch" and shards < slots:
            raise ConfigError(
                f"data.sources.{name}: epoch mode needs a shard for every rank x data.workers "
                f"slot, {world_size} x {workers} = {slots}, but {src.urls!r} has {shards}; use "
                f"mode=resampled, fewer data.workers, or write more, smaller shards"
            )


def check_run_dir(recipe: Recipe) -> None:
    """The run directory out_dir/name can be made (or is there) and written to.  A file in
    the way, or a read-only directory, was a traceback once the engine was built (and
    `--validate` passed it)."""
    from mmssl.cliargs import out_dir_problem

    found = out_dir_problem(recipe.run_dir)
    if found:
        there, problem = found
        key = "name" if there == Path(os.path.abspath(recipe.run_dir)) else "out_dir"
        raise ConfigError(
            f"{key}: the run directory {recipe.run_dir} cannot be made or written: "
            f"{there} {problem}"
        )


def check_resume(recipe: Recipe) -> None:
    """A `checkpoint.resume` that the run would refuse at start (`find_resume`: a checkpoint
    folder, or a run or checkpoints directory holding checkpoint folders, taken as written)
    is refused at --validate too, unless this run has checkpoints of its own to continue
    from (a requeue after its source was deleted).  Only presence is checked here."""
    from mmssl.train.checkpoint import TAG, list_tags

    resume = recipe.checkpoint.resume
    if resume in ("auto", "none") or list_tags(Path(recipe.run_dir) / "checkpoints"):
        return
    path = Path(resume)
    if (
        (TAG.match(path.name) and path.is_dir())
        or list_tags(path / "checkpoints")
        or list_tags(path)
    ):
        return
    # the command line's null or ~ is text for this field, and YAML's spelling of no value
    hint = " (to start afresh write none)" if resume.lower() in ("null", "none", "~", "") else ""
    raise ConfigError(f"checkpoint.resume: no checkpoint at {resume!r}{hint}")
