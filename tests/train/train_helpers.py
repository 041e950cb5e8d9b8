"""Helpers of the training tests: tiny recipes over the demo data, runs in subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
PYTHON = sys.executable
BIN = Path(PYTHON).parent
GROUP_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def restored_env() -> Iterator[None]:
    """In-process engine runs set the one-process group's variables; put them back after."""
    saved = {k: os.environ.get(k) for k in GROUP_ENV}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def demo_urls(recipe: str | Path, demo: str) -> list[str]:
    """Overrides pointing every `data/demo/...` source of a recipe at the session's demo data."""
    data = yaml.safe_load(Path(recipe).read_text())
    return [
        f"data.sources.{name}.urls={demo}/{src['urls'][len('data/demo/') :]}"
        for name, src in data.get("data", {}).get("sources", {}).items()
        if str(src.get("urls", "")).startswith("data/demo/")
    ]


def tiny_overrides(demo: str, out_dir: str, name: str) -> list[str]:
    """The quickstart recipe scaled to a tiny model on the demo data, a few steps."""
    return [
        f"name={name}",
        f"out_dir={out_dir}",
        *demo_urls(RECIPES / "quickstart.yaml", demo),
        "model.overrides={vision: {dim: 32, depth: 2, num_heads: 2}, "
        "text: {vocab_size: 8192, context_length: 16, dim: 32, depth: 2, num_heads: 2}, "
        "embed_dim: 16}",
        "train.global_batch_size=16",
        "train.micro_batch_size=8",
        "schedule.warmup_steps=2",
        "logging.every=1",
        "logging.tensorboard=false",
        "logging.progress=false",
        "data.workers=0",
        "eval.every=0",
    ]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a launched run: no inherited rank variables, one thread per rank."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
            "LOCAL_WORLD_SIZE",
            "GROUP_RANK",
            "ROLE_RANK",
        )
    }
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(cmd: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=clean_env(**env), cwd=str(REPO)
    )


def losses(run_dir: str | Path) -> list[float]:
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def synthetic_recipe(
    tmp: Path,
    name: str,
    steps: int,
    keep_last: int = 5,
    warmup: int = 0,
    every: int = 1,
    world_size: int = 1,
    **train: object,
) -> Path:
    """A tiny CLIP recipe on synthetic data, micro-batches of 4 on each of `world_size`
    ranks, a checkpoint every `every` steps: tmp/NAME.yaml."""
    path = tmp / f"{name}.yaml"
    batch = {"global_batch_size": 4 * world_size, "micro_batch_size": 4}
    recipe = {
        "name": name,
        "out_dir": str(tmp),
        "model": {"name": "test_tiny_clip"},
        "data": {"sources": {"train": {"urls": "synthetic"}}},
        "train": {"steps": steps, **batch, **train},
        "schedule": {"warmup_steps": warmup},
        "checkpoint": {"every": every, "keep_last": keep_last},
        "logging": {"every": 1, "tensorboard": False, "progress": False},
    }
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def tiny_clip_batch(b: int = 4, t: int = 8) -> dict[str, Any]:
    """One source's batch for test_tiny_clip: b random 32 px images and b texts of t ids."""
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(b, 3, 32, 32, generator=g),
        "text": torch.randint(3, 500, (b, t), generator=g),
        "text_mask": torch.ones(b, t, dtype=torch.bool),
    }
