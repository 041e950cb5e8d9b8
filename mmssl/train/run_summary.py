"""What a run's summary says about an attempt: its facts (`run_info`), the bad samples
skipped (`skipped_counts`, collective) and, for a run that an error ended, the summary each
rank writes alone (`error_summary`) with the way to resume (`resume_hint`).  `loop.py`
decides when; `logging.py` writes the files."""

from __future__ import annotations

import logging
import os
import shlex
import time
from typing import Any

from mmssl import distributed
from mmssl.train import checkpoint
from mmssl.train.engine import zero_stage
from mmssl.train.logging import write_error_summary
from mmssl.train.recipe import Recipe, Resolved
from mmssl.train.tasks import Task

_log = logging.getLogger("mmssl.train")


def skipped_counts(streams: dict[str, Any]) -> dict[str, int]:
    """Bad samples skipped so far, by kind, summed over sources and ranks.  Collective."""
    per_rank = distributed.all_gather_object([s.skipped for s in streams.values()])
    return _sum_counts([counts for rank in per_rank for counts in rank])


def _sum_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    """Skip counts by kind, summed over the given dicts."""
    total: dict[str, int] = {}
    for c in counts:
        for kind, n in c.items():
            total[kind] = total.get(kind, 0) + n
    return total


def run_info(
    recipe: Recipe,
    resolved: Resolved,
    task: Task,
    start_step: int,
    step: int,
    t_start: float,
    last_checkpoint: str,
    bad_steps: int,
) -> dict[str, Any]:
    """The summary's facts about this attempt (steps `start_step` -> `step`)."""
    stage = zero_stage(resolved.ds_config)
    return {
        "recipe": recipe.name,
        "steps": f"{start_step} -> {step} of {recipe.train.steps}",
        "world_size": distributed.world_size(),
        "zero_stage": stage,
        "precision": recipe.precision,
        "global_batch_size": recipe.train.global_batch_size,
        "grad_accum": resolved.grad_accum,
        "parameters": task.model.num_params()
        if stage != 3
        else sum(getattr(p, "ds_numel", p.numel()) for p in task.model.parameters()),
        "wall_time_s": round(time.perf_counter() - t_start, 1),
        "checkpoint": last_checkpoint,
        "bad_steps": bad_steps,
    }


def resume_hint(recipe: Recipe, good: str | None, cause: bool = True) -> str:
    """What the user does after a failed (or, `cause` False, a stopped) run: resume from
    `good`, or start again."""
    run_dir = recipe.run_dir
    world = distributed.world_size()
    # --num_gpus counts the ranks of one node: the launcher's LOCAL_WORLD_SIZE
    per_node = os.environ.get("LOCAL_WORLD_SIZE", str(world))
    launch = f"deepspeed --num_gpus {per_node} --module mmssl.train" if world > 1 else "mmssl train"
    if world > 1 and per_node.isdigit() and world > int(per_node):  # several nodes
        nodes = world // int(per_node)
        launch = f"deepspeed --num_nodes {nodes} --num_gpus {per_node} --hostfile HOSTFILE --module mmssl.train"
    # quoted for the shell: an out_dir or name with a space (or any shell character) is one
    # argument when the command is pasted
    command = f"`{launch} {shlex.quote(str(run_dir / 'recipe.yaml'))} checkpoint.resume=auto`"
    if good is None:
        return (
            f"there is no good checkpoint in {run_dir / 'checkpoints'}: fix the cause and start "
            f"again; checkpoint.resume=auto finds none there and starts at step 0, e.g. {command}"
            + (f" (or your launcher's equivalent for all {world} ranks)" if world > 1 else "")
        )
    return (
        f"{'fix the cause, then ' if cause else ''}resume from {good}: rerun the same command with "
        f"checkpoint.resume=auto (the default), which takes that checkpoint, e.g. {command}"
        + (f" (or your launcher's equivalent for all {world} ranks)" if world > 1 else "")
    )


def error_summary(
    err: BaseException,
    recipe: Recipe,
    resolved: Resolved,
    task: Task,
    start_step: int,
    step: int,
    t_start: float,
    bad_steps: int,
    streams: dict[str, Any],
) -> None:
    """summary.md of a run that an error ended (rank R > 0: summary.rank<R>.md): the error,
    the step reached, the newest checkpoint that passes the resume's integrity check and how
    to resume.  No collective: the other ranks may be blocked in one, or gone.  Never raises:
    a failure here is logged and the caller re-raises the original error."""
    rank = distributed.rank()
    try:
        ckpt_dir = recipe.run_dir / "checkpoints"
        # hashed here by this rank alone: the tag resume=auto would take
        tag = checkpoint.newest_valid(ckpt_dir, "error summary", collective=False)
        good = str(ckpt_dir / tag) if tag else None
        info = run_info(
            recipe, resolved, task, start_step, step, t_start, good or "none", bad_steps
        )
        skipped = _sum_counts([s.skipped for s in streams.values()])  # this rank's only
        write_error_summary(recipe.run_dir, rank, info, skipped, err, resume_hint(recipe, good))
    except BaseException as failure:  # noqa: BLE001 -- never masks the run's own error
        _log.warning(
            "rank %d: could not write the summary of the failed run (%s: %s)",
            rank,
            type(failure).__name__,
            failure,
        )
