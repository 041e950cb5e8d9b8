"""Checkpoints through the DeepSpeed engine, with everything an exact resume needs.

`RUN_DIR/checkpoints/step_XXXXXXXX/` is one DeepSpeed checkpoint.  Its client state holds,
besides the engine's own model/optimizer/schedule state:

- `step`: optimizer steps done; `bad_steps`: steps skipped for a non-finite loss or gradient;
- `recipe`: the resolved recipe;
- `descriptor`: the augmentation descriptor layout (version and groups);
- `data`: the data-stream state of every rank (each holds its workers' positions);
- `rng`: the torch, accelerator, numpy and python RNG states of every rank.

DeepSpeed writes the client state from data-parallel rank 0 only, so per-rank states are
gathered to every rank before saving and each rank picks its own entry on load.

A checkpoint is complete once its `manifest.json` (every file's size and sha256) exists,
written last.  `resume=auto` takes the newest checkpoint whose files match their manifest and
names every newer one it skips (a save cut short, a truncated or bit-flipped file).  Hashing
is split over the ranks (a shared file system, as DeepSpeed's own resume needs).  Loading
never unpickles arbitrary objects (`mmssl.train.safe_load`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import pickle
import random
import re
import resource
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmssl import distributed
from mmssl.atomic import write_atomic
from mmssl.data.errors import DataError
from mmssl.schema import ConfigError

# re-exported: the checkpoint API names them (export and the tests import them from here)
from mmssl.train.safe_load import CheckpointError, safe_torch_load, unsafe_error  # noqa: F401

TAG = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
RUN_RECORD = "mmssl_run.json"  # recipe, model, world size, ZeRO stage, ... (run_record)
SAVED = re.compile(r"\.pt$|^mmssl_run\.json$")  # the files a save writes, but its manifest
log = logging.getLogger("mmssl.train")
# torch's words for a checkpoint file it could not write whole (a full disk, a quota)
WRITE_FAILURES = ("unexpected pos", "failed writing file", "file write failed")


def tag_of(step: int) -> str:
    """The checkpoint tag of `step`: step_00001234."""
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    """The step of a checkpoint tag (inverse of `tag_of`)."""
    return int(tag[len("step_") :])


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain data (lists of ints, a uint8 tensor)."""
    from deepspeed.accelerator import get_accelerator

    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    keys = np.asarray(keys)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states saved by `rng_state()`."""
    from deepspeed.accelerator import get_accelerator

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


# ----------------------------------------------------------------------------- manifests


def _files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder (relative, sorted) except the manifest."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    )


def _digest(path: Path, flush: bool = False) -> tuple[int, str]:
    """(size, sha256) of a file; `flush` also forces it to stable storage."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
        if flush:
            os.fsync(f.fileno())
    return path.stat().st_size, h.hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    """Hash the folder's files (split over ranks) and write the manifest last.  Collective."""
    rank, world = distributed.rank(), distributed.world_size()
    files = _files(folder)
    mine = {name: _digest(folder / name, flush=True) for name in files[rank::world]}
    parts = distributed.all_gather_object(mine)
    if rank == 0:
        entries = {k: {"size": s, "sha256": h} for part in parts for k, (s, h) in part.items()}
        manifest = {"format": 1, "step": step, "files": dict(sorted(entries.items()))}
        write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    distributed.barrier()


def verify(folder: Path, collective: bool = True) -> str | None:
    """None if `folder` is a complete checkpoint whose files match the manifest, else what is
    wrong.  `collective`: every rank calls it and hashes a disjoint share of the files."""
    rank, world = (distributed.rank(), distributed.world_size()) if collective else (0, 1)
    problem: str | None = None
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        entries = manifest["files"]
        names = sorted(entries)
        if not all(_entry_ok(entries[name]) for name in names):
            raise ValueError("an entry is not {size: int, sha256: str}")
    except FileNotFoundError:
        problem = f"no {MANIFEST}: the save did not finish"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        problem = f"{MANIFEST} is unreadable"
    if problem is None:
        # DeepSpeed's states or the run record unlisted: written after the manifest, or it is
        # another save's; other files (a note a user left) are not the checkpoint's
        unlisted = [n for n in sorted(set(_files(folder)) - set(names)) if SAVED.search(n)]
        if not names:
            problem = f"{MANIFEST} lists no files"
        elif unlisted:
            problem = f"{unlisted[0]} is not in {MANIFEST}"
    if problem is None:
        for name in names[rank::world]:
            path = folder / name
            if not path.is_file():
                problem = f"{name} is missing"
            elif path.stat().st_size != entries[name]["size"]:
                problem = f"{name} has {path.stat().st_size} bytes, the manifest says {entries[name]['size']}"
            elif _digest(path)[1] != entries[name]["sha256"]:
                problem = f"{name} does not match its sha256 in the manifest"
            if problem:
                break
    if not collective:
        return problem
    found = [p for p in distributed.all_gather_object(problem) if p]
    return found[0] if found else None


def _entry_ok(entry: object) -> bool:
    """A manifest entry {"size": int, "sha256": str}: every rank reads every entry, so a
    damaged one makes the checkpoint unreadable on all of them (one rank's KeyError left
    the others waiting in the gather)."""
    if not isinstance(entry, dict):
        return False
    size, digest = entry.get("size"), entry.get("sha256")
    return isinstance(size, int) and not isinstance(size, bool) and isinstance(digest, str)


def list_tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint tags in `ckpt_dir`, oldest first (complete or not)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG.match(p.name))


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest checkpoint whose save finished (it has a manifest; not hashed here)."""
    done = [t for t in list_tags(ckpt_dir) if (ckpt_dir / t / MANIFEST).is_file()]
    return done[-1] if done else None


def newest_valid(
    ckpt_dir: Path, what: str, collective: bool = True, after: str | None = None
) -> str | None:
    """The newest checkpoint that passes `verify`; logs each newer one it skips.

    after: only the checkpoints newer than this tag are checked (None if none of them is
    good), for a caller that verified `after` itself before."""
    for tag in reversed(list_tags(ckpt_dir)):
        if after is not None and tag <= after:
            return None
        problem = verify(ckpt_dir / tag, collective)
        if problem is None:
            return tag
        if distributed.rank() == 0 or not collective:
            log.warning("%s: skipping checkpoint %s: %s", what, ckpt_dir / tag, problem)
    return None


def manifest_digest(folder: Path) -> str | None:
    """The sha256 of checkpoint `folder`'s manifest (the size and sha256 of each of its
    files): what identifies the checkpoint, where its tag names only its step.  None
    without a manifest."""
    import hashlib

    try:
        return hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def started_from(folder: Path) -> dict[str, Any]:
    """Checkpoint `folder` of another run as a run's starting point (path, manifest digest),
    kept in the run records of the run's own checkpoints."""
    return {"checkpoint": os.path.realpath(folder), "manifest_sha256": manifest_digest(folder)}


def _grew_from(own: Path, tag: str, resume: str) -> bool:
    """Whether checkpoint own/tag's run record says its run started from the checkpoint
    `resume` names (that folder, or one of that run's): the same command requeued."""
    from mmssl.train.run_record import read_started_from

    start = read_started_from(own / tag)
    if not start:
        return False
    origin = Path(start["checkpoint"])
    named = os.path.realpath(resume)
    if named not in (str(origin), str(origin.parent), str(origin.parent.parent)):
        return False
    digest = manifest_digest(origin)  # gone (rotated away) is fine; another one is not
    return digest is None or digest == start.get("manifest_sha256")


def find_resume(resume: str, run_dir: Path) -> tuple[Path, str] | None:
    """resume = auto | none | a checkpoint folder or a run directory -> (dir, tag) or None.

    auto (and a run directory) fall back past incomplete or damaged checkpoints to the newest
    good one; a named checkpoint folder must be good.  A checkpoint of another run is where
    this run starts: once this run has saved a good checkpoint of its own since it started
    there (its run record says so, `started_from`), it continues from that (logged), so that
    the same command requeues it.  Collective."""
    if resume == "none":
        return None
    own = run_dir / "checkpoints"
    if resume == "auto":
        tag = newest_valid(own, "checkpoint.resume=auto")
        if tag is None and list_tags(own) and distributed.rank() == 0:
            log.warning("checkpoint.resume=auto: no good checkpoint in %s; starting at step 0", own)
        return (own, tag) if tag else None
    path = Path(resume)
    tag = newest_valid(own, f"checkpoint.resume={resume}") if list_tags(own) else None
    if tag is not None and _grew_from(own, tag, resume):
        if distributed.rank() == 0:
            log.warning(
                "checkpoint.resume=%s: this run started from there and has saved since; "
                "continuing from %s (to start over from %s, use another name)",
                resume,
                own / tag,
                resume,
            )
        return own, tag
    if TAG.match(path.name) and path.is_dir():
        problem = verify(path)
        if problem:
            raise CheckpointError(f"checkpoint.resume: {path} is not usable: {problem}")
        return path.parent, path.name
    for ckpt in (path / "checkpoints", path):
        if list_tags(ckpt):
            tag = newest_valid(ckpt, "checkpoint.resume")
            if tag is None:
                raise CheckpointError(f"checkpoint.resume: no good checkpoint in {ckpt}")
            return ckpt, tag
    raise FileNotFoundError(f"checkpoint.resume: no checkpoint at {resume}")


def check_no_later(ckpt_dir: Path, start: int, resume: str) -> None:
    """Refuse a run that starts at step `start` (resume=none, or an earlier checkpoint named)
    where `ckpt_dir` holds a good checkpoint of a later step: rotation keeps checkpoints
    after the step it saves, so that one would outlive this run's and win the next
    resume=auto and `mmssl export`.  Damaged or unfinished later ones (those resume=auto
    skipped) are overwritten as the run reaches them.  Collective."""
    for tag in reversed(list_tags(ckpt_dir)):
        if step_of(tag) <= start:
            return
        if verify(ckpt_dir / tag) is None:
            raise ConfigError(
                f"checkpoint.resume={resume}: this run starts at step {start}, but "
                f"{ckpt_dir / tag} is a good checkpoint of a later step; it would outlive this "
                f"run's checkpoints and win the next resume=auto and mmssl export: remove the "
                f"checkpoints after step {start}, use another name, or continue this run with "
                f"checkpoint.resume=auto"
            )


# ----------------------------------------------------------------------------- save / load


def save(
    engine: Any,
    ckpt_dir: Path,
    step: int,
    recipe: dict[str, Any],
    streams: dict[str, Any],
    keep_last: int,
    extra: dict[str, Any] | None = None,
    on_written: Callable[[], None] | None = None,
    tokenizer: dict[str, Any] | None = None,
    origin: dict[str, Any] | None = None,
) -> Path:
    """Save on every rank (each writes its ZeRO shards), then the manifest; keep the newest
    `keep_last` complete checkpoints up to `step`.  `on_written` runs between DeepSpeed's
    write and the manifest (fault injection).  `tokenizer`: the run's pinned tokenizer
    metadata, `origin`: the checkpoint of another run it started from (`started_from`),
    both for the run record.  Collective."""
    from mmssl.descriptor import PIPELINE_LAYOUT, get_layout
    from mmssl.train.engine import fp32_master_names

    data = distributed.all_gather_object({k: s.state_dict() for k, s in streams.items()})
    rngs = distributed.all_gather_object(rng_state())
    client = {
        "step": step,
        "recipe": recipe,
        "descriptor": get_layout(PIPELINE_LAYOUT).to_dict(),
        "data": data,
        "rng": rngs,
        "world_size": distributed.world_size(),
        **(extra or {}),
    }
    masters = fp32_master_names(engine)
    if masters is not None:  # stage 0 with bf16: lets the export read the fp32 masters
        client["fp32_master_names"] = masters
    tag = tag_of(step)
    folder = ckpt_dir / tag
    if distributed.rank() == 0 and folder.exists():
        shutil.rmtree(folder)  # left by an attempt that was rolled back: rewritten whole
    distributed.barrier()
    # made here, so that an unwritable disk fails with its own errno: DeepSpeed logs its
    # mkdir's OSError and goes on to "Parent directory ... does not exist"
    folder.mkdir(parents=True, exist_ok=True)
    # `latest` (DeepSpeed's pointer, which its zero_to_fp32.py reads) is written below, once
    # the manifest is: DeepSpeed writes it before its files, naming a save a kill cuts short
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    except RuntimeError as err:  # a full disk is torch's "unexpected pos 1815424 vs 1815316"
        if not any(m in str(err) for m in WRITE_FAILURES):
            raise  # another failure (a collective, say) as it came
        free, cap = shutil.disk_usage(folder).free, resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        limited = "" if cap == resource.RLIM_INFINITY else f", files limited to {cap} bytes"
        why = f"{free} bytes free there{limited}"
        raise OSError(f"saving checkpoint {folder} failed ({err}); {why}") from err
    if distributed.rank() == 0:  # read before DeepSpeed loads anything (check_resume)
        from mmssl.train.run_record import record

        # the model the run built (engine.module is its Task), not its config file as it
        # is now: the file may have been edited since the run resolved it
        stage = int(engine.zero_optimization_stage())
        run = record(
            recipe, client["world_size"], stage, engine.module.model.cfg, tokenizer, origin
        )
        write_atomic(folder / RUN_RECORD, json.dumps(run, indent=1) + "\n")
    distributed.barrier()
    if on_written is not None:
        on_written()
    write_manifest(folder, step)
    if distributed.rank() == 0:
        write_atomic(ckpt_dir / "latest", tag)
        upto = [t for t in list_tags(ckpt_dir) if step_of(t) <= step]
        done = [t for t in upto if (ckpt_dir / t / MANIFEST).is_file()]
        for old in sorted(set(upto) - set(done[-keep_last:])):
            # the manifest goes first: a removal cut short leaves an incomplete checkpoint
            (ckpt_dir / old / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    distributed.barrier()
    return folder


def _adam_steps(opt: Any, limit: int, folder: Path) -> int:
    """The optimizer state's step count, at most `limit` (the checkpoint's step: a skipped
    step does not step the optimizer); CheckpointError above it, before a replay of that
    many kernel calls (a count of 10**9 in another's checkpoint took the machine's memory)."""
    steps = max((int(s.get("step", 0)) for s in opt.state.values()), default=0)
    if not 0 <= steps <= limit:
        raise CheckpointError(
            f"checkpoint {folder}: its optimizer state has taken {steps} steps, the "
            f"checkpoint is at step {limit}: not a state this run wrote"
        )
    return steps


def _replay_cpu_adam(engine: Any, limit: int, folder: Path) -> None:
    """Make DeepSpeed's CPU FusedAdam continue exactly after a resume.

    Its C++ kernel keeps beta^t in one process-wide state, advanced as a float32 running
    product from step to step, but computed with pow() on the first call of a process.  A
    run resumed in a new process at step k+1 then uses pow(beta, k+1) where the
    uninterrupted run had the product: the updates differ in the last bits.  Replaying steps
    1..k on a one-element dummy rebuilds the product (a far step first forces the pow path,
    whatever an earlier run of this process left)."""
    from deepspeed.accelerator import get_accelerator

    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the basic one
    if hasattr(opt, "ds_opt_adam"):  # ZeRO offload's DeepSpeedCPUAdam: the same kernel state
        _replay_offload_adam(opt, _adam_steps(opt, limit, folder))
        return
    if get_accelerator().device_name() != "cpu" or not hasattr(opt, "multi_tensor_adam"):
        return
    steps = _adam_steps(opt, limit, folder)
    if steps == 0:
        return
    from deepspeed.ops.adam.fused_adam import multi_tensor_applier

    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    dummy = [[torch.zeros(1)] for _ in range(4)]  # grads, params, exp_avg, exp_avg_sq
    for step in itertools.chain((2**30,), range(1, steps + 1)):
        multi_tensor_applier(
            opt.multi_tensor_adam,
            opt._dummy_overflow_buf,
            dummy,
            0.0,
            beta1,
            beta2,
            group["eps"],
            step,
            opt.adam_w_mode,
            1 if group["bias_correction"] else 0,
            0.0,
        )


def _replay_offload_adam(opt: Any, steps: int) -> None:
    """`_replay_cpu_adam` for DeepSpeedCPUAdam (ZeRO offload): its per-optimizer kernel state
    keeps beta^t the same way (a call repeating the last step leaves it as it is).  The steps
    are read from the state itself: ZeRO-3 empties the param groups between steps."""
    if steps == 0:
        return
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    dummy = [torch.zeros(1) for _ in range(4)]  # params, grads, exp_avg, exp_avg_sq
    for step in itertools.chain((2**30,), range(1, steps + 1)):
        opt.ds_opt_adam.adam_update(
            opt.opt_id, step, 0.0, beta1, beta2, group["eps"], 0.0, group["bias_correction"], *dummy
        )


def load(engine: Any, ckpt_dir: Path, tag: str, streams: dict[str, Any]) -> dict[str, Any]:
    """Restore engine, data positions and RNG states of this rank; returns the client state
    (`step`, `bad_steps`, ...).  Only allow-listed objects are unpickled."""
    folder = ckpt_dir / tag
    try:
        with safe_torch_load():
            path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    except pickle.UnpicklingError as err:
        raise unsafe_error(folder, err) from None
    if path is None:
        raise CheckpointError(f"could not load checkpoint {folder}")
    step = client.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise CheckpointError(f"checkpoint {folder}: its step is {step!r}, not a step count")
    _replay_cpu_adam(engine, step, folder)
    rank, world = distributed.rank(), distributed.world_size()
    if client.get("world_size") != world:
        raise ConfigError(
            f"checkpoint {folder} was written by {client.get('world_size')} ranks, this "
            f"run has {world}: the data positions cannot be mapped"
        )
    from mmssl.descriptor import PIPELINE_LAYOUT, get_layout

    if client.get("descriptor") != get_layout(PIPELINE_LAYOUT).to_dict():
        raise ConfigError(
            f"checkpoint {folder} uses another descriptor layout: {client.get('descriptor')}"
        )
    for name, stream in streams.items():
        try:
            stream.load_state_dict(client["data"][rank][name])
        except DataError as err:  # the shard count of data.sources.NAME.urls, mostly
            keep = {
                "shard count": " (a resume keeps its shard count)",
                "epoch length": " (a resume keeps the epoch's length: its data, batch size "
                "and, for text, context length)",
            }
            same = "".join(v for k, v in keep.items() if k in str(err))
            raise ConfigError(f"checkpoint {folder}: data source {name!r}: {err}{same}") from None
    set_rng_state(client["rng"][rank])
    return client
