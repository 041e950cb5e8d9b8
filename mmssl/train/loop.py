"""The training loop: one function, `train(recipe, resolved)`, run identically on every rank.

Host syncs happen only at log intervals: per-step metrics stay detached tensors that are
summed on the device and read (and averaged over ranks) every `logging.every` steps.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmssl import distributed
from mmssl.train import checkpoint
from mmssl.train.engine import device, init_distributed, initialize, zero_stage
from mmssl.train.logging import RunLogger
from mmssl.train.recipe import Recipe, Resolved, dump_recipe
from mmssl.train.streams import build_stream, build_streams
from mmssl.train.tasks import Task, register_zero3_params


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: dict[str, Any], dev: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors (and lists of tensors) to `dev`; floating tensors to the training dtype."""

    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(dev, dtype if x.is_floating_point() else None, non_blocking=True)
        if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            return [move(v) for v in x]
        return x

    return {k: move(v) for k, v in batch.items()}


def _prepare_run_dir(recipe: Recipe, run_dir: Path) -> None:
    if distributed.rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    distributed.barrier()


def _eval_loss(
    engine: Any, recipe: Recipe, resolved: Resolved, dev: torch.device, dtype: torch.dtype
) -> dict[str, float]:
    """Mean held-out metrics over `eval.batches` batches of freshly started eval streams."""
    rank, world = distributed.rank(), distributed.world_size()
    streams = {
        train_src: build_stream(
            held_out,
            recipe.data.sources[held_out],
            recipe,
            resolved.model,
            rank,
            world,
            seed_offset=1,
        )
        for train_src, held_out in recipe.eval.sources.items()
    }
    rng = checkpoint.rng_state()  # evaluation must not shift the training randomness
    engine.eval()
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for _ in range(recipe.eval.batches):
            _, metrics = engine({k: to_device(s.next(), dev, dtype) for k, s in streams.items()})
            for k, v in metrics.items():
                sums[k] = sums[k] + v.float() if k in sums else v.float()
    engine.train()
    checkpoint.set_rng_state(rng)
    keys = sorted(sums)
    values = distributed.all_reduce_mean(torch.stack([sums[k] for k in keys]))
    return {f"eval/{k}": v / recipe.eval.batches for k, v in zip(keys, values.tolist())}


def train(recipe: Recipe, resolved: Resolved) -> dict[str, Any]:
    """Run (or resume) the recipe; returns the run summary.  Collective: call on every rank."""
    init_distributed()
    rank, world = distributed.rank(), distributed.world_size()
    if world != resolved.world_size:
        raise RuntimeError(f"validated for {resolved.world_size} ranks, running on {world}")
    dev = device()
    dtype = torch.bfloat16 if recipe.precision == "bf16" else torch.float32
    run_dir = recipe.run_dir

    # the same seed on every rank: identical initial weights before any broadcast
    seed_everything(recipe.train.seed)
    from mmssl.models.multimodal import MultimodalModel

    task = Task(MultimodalModel(resolved.model), recipe.objectives)
    engine = initialize(task, recipe, resolved.ds_config)
    if zero_stage(resolved.ds_config) == 3:
        register_zero3_params(engine.module)
    # from here on each rank draws its own random numbers (drop_path, ...)
    seed_everything(recipe.train.seed + 1000 * (rank + 1))
    streams = build_streams(recipe, resolved.model, rank, world)

    found = checkpoint.find_resume(recipe.checkpoint.resume, run_dir)
    _prepare_run_dir(recipe, run_dir)
    step = checkpoint.load(engine, found[0], found[1], streams) if found else 0
    ckpt_dir = run_dir / "checkpoints"
    end = recipe.train.stop_at or recipe.train.steps
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
    recipe_dict = recipe.to_dict()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    t_start = time.perf_counter()
    start_step = step
    while step < end:
        for _ in range(resolved.grad_accum):
            batches = {k: to_device(s.next(), dev, dtype) for k, s in streams.items()}
            loss, metrics = engine(batches)
            engine.backward(loss)
            engine.step()
            for k, v in metrics.items():
                sums[k] = sums[k] + v.float() if k in sums else v.float()
            count += 1
        step += 1
        log.advance()
        if step % recipe.logging.every == 0 or step == end:
            keys = sorted(sums)
            values = distributed.all_reduce_mean(torch.stack([sums[k] for k in keys]) / count)
            row = dict(zip(keys, values.tolist()))
            if recipe.eval.every and step % recipe.eval.every == 0:
                row.update(_eval_loss(engine, recipe, resolved, dev, dtype))
            log.log(step, row, engine.get_lr()[0])
            sums, count = {}, 0
        every = recipe.checkpoint.every
        if (every and step % every == 0) or step == end:
            checkpoint.save(
                engine, ckpt_dir, step, recipe_dict, streams, recipe.checkpoint.keep_last
            )
    skipped: dict[str, int] = {}
    for per_rank in distributed.all_gather_object({k: s.skipped for k, s in streams.items()}):
        for counts in per_rank.values():
            for kind, n in counts.items():
                skipped[kind] = skipped.get(kind, 0) + n
    info = {
        "recipe": recipe.name,
        "steps": f"{start_step} -> {step} of {recipe.train.steps}",
        "world_size": world,
        "zero_stage": zero_stage(resolved.ds_config),
        "precision": recipe.precision,
        "global_batch_size": recipe.train.global_batch_size,
        "grad_accum": resolved.grad_accum,
        "parameters": task.model.num_params()
        if zero_stage(resolved.ds_config) != 3
        else sum(getattr(p, "ds_numel", p.numel()) for p in task.model.parameters()),
        "wall_time_s": round(time.perf_counter() - t_start, 1),
        "checkpoint": str(ckpt_dir / checkpoint.tag_of(step)),
    }
    log.close(info, skipped)
    return {
        **info,
        "samples_per_s": log.samples_per_s,
        "skipped": skipped,
        "final_step": step,
        "engine": engine,
    }
