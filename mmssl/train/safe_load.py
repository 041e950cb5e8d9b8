"""Loading checkpoints without unpickling arbitrary objects: every `torch.load` of a load,
DeepSpeed's included, runs with `weights_only=True` and an allow-list of the few DeepSpeed
classes its optimizer states hold.  `CheckpointError` is the error of a checkpoint that is
incomplete, damaged or unsafe to load (`mmssl.train.checkpoint` re-exports it)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mmssl.schema import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint that is incomplete, damaged or unsafe to load; the message names it."""


def allowed_globals() -> list[Any]:
    """The classes DeepSpeed pickles into optimizer states, besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def safe_torch_load() -> Iterator[None]:
    """Inside, every torch.load (DeepSpeed passes weights_only=False) is weights_only=True
    with `allowed_globals()`: a pickle that would build any other object is refused."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ[keys[0]] = "1"
    os.environ.pop(keys[1], None)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def refused_file(folder: Path) -> tuple[Path, str] | None:
    """The first *.pt file of `folder` that a safe load refuses, with torch's reason."""
    for path in sorted(folder.glob("*.pt")):
        try:
            with safe_torch_load():
                torch.load(path, map_location="cpu")
        except pickle.UnpicklingError as err:
            lines = [x.strip() for x in str(err).splitlines() if "global" in x.lower()]
            return path, (lines[0] if lines else str(err).splitlines()[0])
    return None


def unsafe_error(folder: Path, err: Exception) -> CheckpointError:
    """The CheckpointError for a refused safe load of `folder`, naming the offending file when
    one is found (else the folder and the first line of `err`)."""
    found = refused_file(folder)
    where, why = found if found else (folder, str(err).splitlines()[0])
    return CheckpointError(
        f"refusing to load {where}: it pickles objects outside the allow-list of plain tensors, "
        f"containers and DeepSpeed's optimizer classes ({why})"
    )
