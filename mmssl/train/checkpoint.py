"""Checkpoints through the DeepSpeed engine, with everything an exact resume needs.

`RUN_DIR/checkpoints/step_XXXXXXXX/` is one DeepSpeed checkpoint (`latest` names the newest).
Its client state holds, besides the engine's own model/optimizer/schedule state:

- `step`: optimizer steps done;
- `recipe`: the resolved recipe;
- `descriptor`: the augmentation descriptor layout (version and groups);
- `data`: the data-stream state of every rank (each holds its workers' positions);
- `rng`: the torch, accelerator, numpy and python RNG states of every rank.

DeepSpeed writes the client state from data-parallel rank 0 only, so per-rank states are
gathered to every rank before saving and each rank picks its own entry on load.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmssl import distributed
from mmssl.schema import ConfigError

TAG = re.compile(r"^step_(\d{8})$")


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


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
    from deepspeed.accelerator import get_accelerator

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def list_tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint tags in `ckpt_dir`, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG.match(p.name))


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag DeepSpeed's `latest` file names, else the newest step_* folder."""
    latest = ckpt_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (ckpt_dir / tag).is_dir():
            return tag
    tags = list_tags(ckpt_dir)
    return tags[-1] if tags else None


def find_resume(resume: str, run_dir: Path) -> tuple[Path, str] | None:
    """resume = auto | none | a checkpoint folder or a run directory -> (dir, tag) or None."""
    if resume == "none":
        return None
    if resume == "auto":
        ckpt = run_dir / "checkpoints"
        tag = latest_tag(ckpt)
        return (ckpt, tag) if tag else None
    path = Path(resume)
    if TAG.match(path.name) and path.is_dir():
        return path.parent, path.name
    for ckpt in (path / "checkpoints", path):
        tag = latest_tag(ckpt)
        if tag:
            return ckpt, tag
    raise FileNotFoundError(f"checkpoint.resume: no checkpoint at {resume}")


def save(
    engine: Any,
    ckpt_dir: Path,
    step: int,
    recipe: dict[str, Any],
    streams: dict[str, Any],
    keep_last: int,
) -> Path:
    """Save on every rank (each writes its ZeRO shards); keep only the newest `keep_last`."""
    from mmssl.descriptor import get_layout

    data = distributed.all_gather_object({k: s.state_dict() for k, s in streams.items()})
    rngs = distributed.all_gather_object(rng_state())
    client = {
        "step": step,
        "recipe": recipe,
        "descriptor": get_layout("v1").to_dict(),
        "data": data,
        "rng": rngs,
        "world_size": distributed.world_size(),
    }
    tag = tag_of(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client)
    distributed.barrier()
    if distributed.rank() == 0:
        for old in list_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    distributed.barrier()
    return ckpt_dir / tag


def load(engine: Any, ckpt_dir: Path, tag: str, streams: dict[str, Any]) -> int:
    """Restore engine, data positions and RNG states of this rank; returns the step."""
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise FileNotFoundError(f"could not load checkpoint {ckpt_dir / tag}")
    rank, world = distributed.rank(), distributed.world_size()
    if client.get("world_size") != world:
        raise ConfigError(
            f"checkpoint {ckpt_dir / tag} was written by {client.get('world_size')} ranks, this "
            f"run has {world}: the data positions cannot be mapped"
        )
    from mmssl.descriptor import get_layout

    if client.get("descriptor") != get_layout("v1").to_dict():
        raise ConfigError(
            f"checkpoint {ckpt_dir / tag} uses another descriptor layout: "
            f"{client.get('descriptor')}"
        )
    for name, stream in streams.items():
        stream.load_state_dict(client["data"][rank][name])
    set_rng_state(client["rng"][rank])
    return int(client["step"])
