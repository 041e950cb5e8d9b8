"""The training loop: one function, `train(recipe, resolved)`, run identically on every rank.

The loop's own host syncs happen only at log intervals: per-step metrics stay detached
tensors that are summed on the device and read (and averaged over ranks) every `logging.every`
steps, and the losses' cross-rank gathers skip their size exchange (`distributed.equal_batches`),
and `positives: caption` groups identical captions with sorts on an accelerator
(`objectives.contrastive.row_groups`).  Exceptions, one sync a forward each: the fp32 stage-0
gradient check below, the text tower's trim of all-padding columns (`models.text_masks.
trim_padding`: it sizes the tensors that follow) and the fused LM head's test for ignored
targets (`nn.linear_ce`).  With bf16 weights and a torch AdamW (`optim.impl` torch/foreach/
fused), DeepSpeed's optimizer wrapper tests each gradient for overflow on the host.

Non-finite steps (`mmssl.train.nonfinite`): a step whose loss or gradient holds NaN/inf is
skipped, counted (`bad_steps` in the metrics and the summary) and left out of the metric
averages; `train.max_bad_steps` in a row stop the run with `NonFiniteError`, keeping the last
good checkpoint (none is saved in a streak; the message and summary.md name it).  On the
plain fp32 stage-0 path the loop checks the gradients itself: one extra host sync per step.

Any other error ends the run unplanned, perhaps on one rank while another waits in a
collective, so its summary is written with none: each rank that caught the error writes its own
(rank 0 summary.md and loss.png, rank R > 0 summary.rank<R>.md), naming the error, the steps
done, the newest checkpoint that passes the resume's integrity check (hashed by that rank
alone) and how to resume; then the error propagates unchanged (a failure writing it is only
logged).  Ctrl-C and SystemExit write none.  A later good run removes the rank files.

Gradient accumulation: a step draws all its micro-batches (every source) before its first
forward and keeps them on the host, moving each to the device just before its forward.  The
token-mean objectives (next_token, captioning) count their targets over the whole step from
those host batches, with one all-reduce per step, and every micro-batch is normalised by
that count (`tasks.StepTargets`), so the accumulated gradient is the token mean over the
step's tokens, as one big batch gives it.  The logged `loss` and `loss/<objective>` are
averages over the step's micro-batches (and over steps and ranks), which for a token-mean
objective is the step's token mean.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmssl import distributed
from mmssl.data.errors import DataError
from mmssl.schema import ConfigError
from mmssl.train import checkpoint, host_memory, nonfinite, preempt, run_record, run_summary
from mmssl.train.engine import device, init_distributed, initialize, zero_stage
from mmssl.train.faults import Faults
from mmssl.train.freeze import apply_freeze
from mmssl.train.host_memory import keep_freed_memory
from mmssl.train.init_from import load_init
from mmssl.train.logging import RunLogger
from mmssl.train.recipe import Recipe, Resolved, dump_recipe
from mmssl.train.run_lock import RunDirLock
from mmssl.train.streams import (
    build_stream,
    build_streams,
    eval_source_seeds,
    packed_sources,
    tokenizer_name,
    tokenizer_record,
)
from mmssl.train.streams import tokenizer as recipe_tokenizer
from mmssl.train.tasks import StepTargets, Task
from mmssl.train.text_condition import source_prompts
from mmssl.train.zero3 import register_zero3_params

_log = logging.getLogger("mmssl.train")


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_task(recipe: Recipe, model_cfg: Any, warm: bool = False) -> Task:
    """The recipe's model (randomly initialised; with `warm`, then train.init_from's weights
    loaded; train.freeze applied) and objectives; condition prompts are tokenized with
    `data.tokenizer`, as the captions are, which is loaded only for them."""
    from mmssl.models.multimodal import MultimodalModel

    tok = recipe_tokenizer(recipe) if source_prompts(recipe.objectives) else None
    model = MultimodalModel(model_cfg)
    if warm:  # before the Task reshapes its 0-d parameters (promote_scalar_params)
        load_init(model, recipe, model_cfg)
    task = Task(model, recipe.objectives, tok, packed_sources(recipe))
    apply_freeze(task.model, recipe.train.freeze)
    return task


def to_device(batch: dict[str, Any], dev: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors (and lists of tensors) to `dev`; floating tensors to the training dtype but the
    augmentation descriptors (`aug`): AugSelf regresses their differences in fp32, and bf16
    had rounded a difference of 0.02 by up to 0.005 (the conditioner casts them itself)."""

    def move(x: Any, cast: bool) -> Any:
        if isinstance(x, torch.Tensor):
            to = dtype if cast and x.is_floating_point() else None
            return x.to(dev, to, non_blocking=True)
        if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            return [move(v, cast) for v in x]
        return x

    return {k: move(v, k != "aug") for k, v in batch.items()}


def _next_batches(streams: dict[str, Any], keys: dict[str, list[str]]) -> dict[str, Any]:
    """One micro-batch of every source, on the host; their sample keys go to `keys`."""
    out = {}
    for name, stream in streams.items():
        try:
            batch = stream.next()
        except DataError as err:
            raise DataError(f"data.sources.{name}: {err}") from None
        keys.setdefault(name, []).extend(batch.get("__key__", ()))
        out[name] = batch
    return out


def _step_targets(
    task: Task, micro_batches: list[dict[str, Any]], dev: torch.device
) -> StepTargets | None:
    """The targets of the step's token-mean objectives, counted on the host over this rank's
    `micro_batches` and summed over ranks (one all-reduce); None when there are no such
    objectives.  Collective."""
    per_micro = [task.target_counts(batches) for batches in micro_batches]
    names = sorted(per_micro[0])
    if not names:
        return None
    local = torch.tensor([sum(c[k] for c in per_micro) for k in names], dtype=torch.int64)
    counts = distributed.all_reduce_sum(local.to(dev))
    return StepTargets(dict(zip(names, counts.unbind())), len(micro_batches))


class KeyLog:
    """The sample keys of every step of this rank: RUN_DIR/keys/rank<R>.jsonl, one JSON line
    {step, keys: {source: [...]}} per step.  On resume, lines after `start_step` (and a line
    cut short by a kill) are dropped, so the file is the stream the weights saw."""

    def __init__(self, run_dir: Path, rank: int, start_step: int, enabled: bool) -> None:
        self.file: Any = None
        if not enabled:
            return
        path = run_dir / "keys" / f"rank{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
            try:
                if json.loads(line)["step"] <= start_step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
        self.file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 -- closed in close()

    def write(self, step: int, keys: dict[str, list[str]]) -> None:
        """Append the sample keys of `step`, by source."""
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "keys": keys}) + "\n")

    def close(self) -> None:
        """Close the file (a no-op when disabled or closed)."""
        if self.file is not None:
            self.file.close()
            self.file = None


def _summarised(run_dir: Path, step: int) -> bool:
    """Whether RUN_DIR/summary.md is that of a run that ended well at `step`: not a failed
    attempt's, nor one of an earlier stop.  A run killed between its last checkpoint and its
    summary has none of its own, and writes it when run again."""
    try:
        lines = (run_dir / "summary.md").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    ended = f" -> {step} of "
    return (
        bool(lines)
        and lines[0] == f"# Run summary: {run_dir.name}"
        and any(line.startswith("- steps: ") and ended in line for line in lines)
    )


def _prepare_run_dir(recipe: Recipe, run_dir: Path) -> None:
    if distributed.rank() == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # validate checked it: something changed since
            raise ConfigError(f"out_dir: cannot make the run directory {run_dir}: {err}") from None
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    distributed.barrier()


def _eval_loss(
    engine: Any, recipe: Recipe, resolved: Resolved, dev: torch.device, dtype: torch.dtype
) -> dict[str, float]:
    """Mean held-out metrics over `eval.batches` batches of freshly started eval streams."""
    rank, world = distributed.rank(), distributed.world_size()
    seeds = eval_source_seeds(recipe)
    streams = {
        train_src: build_stream(
            held_out,
            recipe.data.sources[held_out],
            recipe,
            resolved.model,
            rank,
            world,
            seed_offset=1,
            seed=seeds[held_out],
        )
        for train_src, held_out in recipe.eval.sources.items()
    }
    rng = checkpoint.rng_state()  # evaluation must not shift the training randomness
    engine.eval()
    sums: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for _ in range(recipe.eval.batches):
                batch = {k: to_device(s.next(), dev, dtype) for k, s in streams.items()}
                for k, v in engine(batch)[1].items():
                    sums[k] = sums[k] + v.float() if k in sums else v.float()
    finally:  # their workers stop now (as the training streams' at the end of the run)
        for stream in streams.values():
            stream.close()
    engine.train()
    checkpoint.set_rng_state(rng)
    keys = sorted(sums)
    values = distributed.all_reduce_mean(torch.stack([sums[k] for k in keys]))
    return {f"eval/{k}": v / recipe.eval.batches for k, v in zip(keys, values.tolist())}


def train(recipe: Recipe, resolved: Resolved) -> dict[str, Any]:
    """Run (or resume) the recipe; returns the run summary.  Collective: call on every rank."""
    # ZeRO-3 replaces torch.nn.functional.linear with its memory-efficient version for good
    # (DeepSpeed: "This will persist unless manually reset"); a later run in this process
    # (a test driver, a sweep) must not inherit it, since it changes bf16 numerics
    linear = torch.nn.functional.linear
    lock = RunDirLock(recipe.run_dir)
    try:
        return _train(recipe, resolved, lock)
    finally:
        lock.release()
        torch.nn.functional.linear = linear


def _train(recipe: Recipe, resolved: Resolved, lock: RunDirLock) -> dict[str, Any]:
    init_distributed()
    rank, world = distributed.rank(), distributed.world_size()
    if world != resolved.world_size:
        raise RuntimeError(f"validated for {resolved.world_size} ranks, running on {world}")
    # one run at a time in a run directory: before anything is built (DeepSpeed's NVMe
    # offload clears its swap folders in initialize) or the resume is looked for
    lock.acquire()
    dev = device()
    if dev.type == "cpu" and recipe.train.keep_host_memory:
        keep_freed_memory()
    elif dev.type == "cpu" and host_memory.kept():
        _log.warning(
            "train.keep_host_memory=false has no effect here: an earlier run in this process "
            "set it, and the setting is process-wide (run this one in its own process)"
        )
    dtype = torch.bfloat16 if recipe.precision == "bf16" else torch.float32
    run_dir = recipe.run_dir
    faults = Faults.from_env(run_dir, rank)

    found = checkpoint.find_resume(recipe.checkpoint.resume, run_dir)
    if found:
        stage = zero_stage(resolved.ds_config)
        run_record.check_resume(found[0] / found[1], recipe.to_dict(), world, stage)
    # the same seed on every rank: identical initial weights before any broadcast
    seed_everything(recipe.train.seed)
    # a resume's checkpoint holds the weights (train.init_from may be gone by then)
    task = build_task(recipe, resolved.model, warm=not found)
    # the tokenizer as the run starts, pinned in every run record (its file may change later)
    pinned = tokenizer_record(tokenizer_name(recipe)) if resolved.model.text else None
    engine = initialize(task, recipe, resolved.ds_config)
    if zero_stage(resolved.ds_config) == 3:
        register_zero3_params(engine.module)
    # DeepSpeed's ZeRO and bf16 optimizers skip overflowing steps themselves
    own_check = not hasattr(engine.optimizer, "overflow")
    # from here on each rank draws its own random numbers (drop_path, ...)
    seed_everything(recipe.train.seed + 1000 * (rank + 1))
    streams = build_streams(recipe, resolved.model, rank, world)

    start = checkpoint.step_of(found[1]) if found else 0
    checkpoint.check_no_later(run_dir / "checkpoints", start, recipe.checkpoint.resume)
    # the checkpoint of another run this run's line started from, kept in its run records
    # (a requeue with the same checkpoint.resume continues the line: find_resume)
    origin = None
    if found and os.path.realpath(found[0]) != os.path.realpath(run_dir / "checkpoints"):
        origin = checkpoint.started_from(found[0] / found[1])
    elif found:
        origin = run_record.read_started_from(found[0] / found[1])
    client = checkpoint.load(engine, found[0], found[1], streams) if found else {}
    step = int(client.get("step", 0))
    bad_steps = int(client.get("bad_steps", 0))
    ckpt_dir = run_dir / "checkpoints"
    end = recipe.train.stop_at or recipe.train.steps
    if step >= end and _summarised(run_dir, step):
        # a finished run run again: nothing to train, and the run directory (its summary.md,
        # metrics, plot) keeps what the run that trained it wrote.  One killed between its
        # last checkpoint and its summary goes on below and writes the summary
        if rank == 0:
            _log.info("%s: already complete at step %d; nothing to do", run_dir, step)
        last = str(ckpt_dir / checkpoint.tag_of(step))
        t_now = time.perf_counter()
        info = run_summary.run_info(recipe, resolved, task, step, step, t_now, last, bad_steps)
        return {
            **info,
            "samples_per_s": 0.0,
            "skipped": {},
            "final_step": step,
            "engine": engine,
            "complete": True,  # nothing was done: the run was already complete
        }
    _prepare_run_dir(recipe, run_dir)  # after the load: a refused resume leaves the run as it was
    samples_per_step = recipe.train.global_batch_size
    log = RunLogger(
        run_dir,
        rank == 0,
        recipe.train.steps,
        step,
        samples_per_step,
        recipe.logging.tensorboard,
        recipe.logging.progress,
    )
    key_log = KeyLog(run_dir, rank, step, recipe.logging.keys)
    recipe_dict = recipe.to_dict()
    # this logging interval's metric sums, carried over a stop and resume: the resumed run
    # logs the same rows as an uninterrupted one
    carried = client.get("log_interval", [{}] * world)[rank] or {"sums": {}, "count": 0}
    sums = {k: torch.tensor(v, dtype=torch.float32, device=dev) for k, v in carried["sums"].items()}
    count = int(carried["count"])
    streak = int(client.get("bad_streak", 0))  # consecutive skipped steps, across a resume
    seen: set[str] = set()  # metric names seen
    t_start = time.perf_counter()
    start_step = step
    preempted = False

    def save(step: int) -> None:
        t_save = time.perf_counter()
        checkpoint.save(
            engine,
            ckpt_dir,
            step,
            recipe_dict,
            streams,
            nonfinite.rotation(recipe.checkpoint.keep_last, streak),
            extra={
                "bad_steps": bad_steps,
                "bad_streak": streak,
                "log_interval": distributed.all_gather_object(
                    {"sums": {k: v.item() for k, v in sums.items()}, "count": count}
                ),
            },
            on_written=functools.partial(faults.pause, "save", step),
            tokenizer=pinned,
            origin=origin,
        )
        log.exclude(time.perf_counter() - t_save)  # from the next interval

    sigterm = preempt.SigtermStop(recipe.checkpoint.sigterm_check_every)
    try:
        # every rank's micro-batch has train.micro_batch_size rows, so the losses' gathers
        # need not exchange sizes (a host sync each on GPU)
        with distributed.equal_batches(), sigterm:
            while step < end:
                step_sums: dict[str, torch.Tensor] = {}
                keys: dict[str, list[str]] = {}
                micro_batches = [_next_batches(streams, keys) for _ in range(resolved.grad_accum)]
                targets = _step_targets(task, micro_batches, dev)
                for micro, host in enumerate(micro_batches):
                    # each micro-batch reaches the device only for its own forward
                    loss, metrics = engine(
                        {k: to_device(b, dev, dtype) for k, b in host.items()}, targets
                    )
                    engine.backward(nonfinite.finite_or_nan(faults.poison(loss, step + 1)))
                    for k, v in metrics.items():
                        step_sums[k] = step_sums[k] + v.float() if k in step_sums else v.float()
                    if micro < resolved.grad_accum - 1:
                        engine.step()
                        continue
                    faults.pause("mid_step", step + 1)
                    lr = engine.get_lr()[0]  # this step's: engine.step() advances the schedule
                    if own_check and not nonfinite.grads_finite(engine):
                        nonfinite.skip_update(engine)
                    else:
                        engine.step()
                step += 1
                key_log.write(step, keys)
                seen.update(step_sums)
                if engine.was_step_applied():
                    for k, v in step_sums.items():
                        sums[k] = sums[k] + v if k in sums else v
                    count += resolved.grad_accum
                    streak = 0
                else:
                    bad_steps += 1
                    streak += 1
                    if rank == 0 and streak == 1:
                        _log.warning(
                            "step %d: non-finite loss or gradient, step skipped (%d so far)",
                            step,
                            bad_steps,
                        )
                    if streak >= recipe.train.max_bad_steps:
                        raise nonfinite.stop(ckpt_dir, step, streak)
                log.advance()
                evaluate = recipe.eval.every > 0 and step % recipe.eval.every == 0
                if step % recipe.logging.every == 0 or step == end or evaluate:
                    # an interval of skipped steps only logs NaN (every rank agrees: the skip
                    # decision is global)
                    row: dict[str, float] = dict.fromkeys(sorted(seen), float("nan"))
                    if sums:
                        names = sorted(sums)
                        values = distributed.all_reduce_mean(
                            torch.stack([sums[k] for k in names]) / count
                        )
                        row = dict(zip(names, values.tolist()))
                    row["bad_steps"] = bad_steps
                    if evaluate:
                        t_eval = time.perf_counter()
                        row.update(_eval_loss(engine, recipe, resolved, dev, dtype))
                        log.exclude(time.perf_counter() - t_eval)
                    log.log(step, row, lr)
                    # else a row mid-interval (the run's end, or an eval step between log
                    # steps): the interval's sums go on
                    if step % recipe.logging.every == 0:
                        sums, count = {}, 0
                saved = nonfinite.save_due(step, recipe.checkpoint.every, end, streak)
                if saved:
                    save(step)
                faults.pause("step_end", step)
                if step < end and sigterm.agreed(step, dev):
                    if not saved:
                        save(step)  # as at the run's end: one in a streak deletes none
                    preempted = True
                    break
    except nonfinite.NonFiniteError as err:
        # a planned end of the run, on every rank at the same step (the skip decision is
        # global), so the summary's gathers are safe here, unlike after any other error
        good = str(err.checkpoint) if err.checkpoint else "none"
        info = run_summary.run_info(
            recipe, resolved, task, start_step, step, t_start, good, bad_steps
        )
        hint = run_summary.resume_hint(recipe, str(err.checkpoint) if err.checkpoint else None)
        info = {**info, "stopped": str(err), "what next": hint}
        log.close(info, run_summary.skipped_counts(streams))
        raise
    except BaseException as err:
        try:  # closing TensorBoard can fail too (a full disk, a dead data worker's signal)
            log.abort()
        except Exception as close_err:
            _log.warning("closing the progress bar and TensorBoard failed: %r", close_err)
        # any other error may strike one rank while another waits in a collective (or is
        # gone), so this summary is written by each rank that caught it, from what that rank
        # knows, with no collective.  Not for Ctrl-C (KeyboardInterrupt) or SystemExit: the
        # summary hashes the newest checkpoints first, which would hold up a stop asked for
        if isinstance(err, Exception):
            run_summary.error_summary(
                err, recipe, resolved, task, start_step, step, t_start, bad_steps, streams
            )
        raise
    finally:
        key_log.close()
        # the data workers stop now, not at interpreter exit: an error's traceback keeps the
        # loaders alive until then, and multiprocessing's exit kill left their temporary
        # directories (pymp-*) behind
        for stream in streams.values():
            stream.close()
    skipped = run_summary.skipped_counts(streams)
    last = str(ckpt_dir / checkpoint.tag_of(step))
    info = run_summary.run_info(recipe, resolved, task, start_step, step, t_start, last, bad_steps)
    if preempted:
        hint = run_summary.resume_hint(recipe, last, cause=False)
        info = {**info, "stopped": f"SIGTERM at step {step}: saved {last}", "what next": hint}
    log.close(info, skipped)
    # no rank leaves before rank 0 wrote summary.md and loss.png: a launcher kills the other
    # ranks once one exits with an error, and a rank that aborted at its teardown ("terminate
    # called without an active exception") had cost a finished run its summary
    distributed.barrier()
    return {
        **info,
        "samples_per_s": log.samples_per_s,
        "skipped": skipped,
        "final_step": step,
        "engine": engine,
        "preempted": preempted,
    }
