"""What every evaluation starts from: a model directory (or a run directory, exported on the
fly) loaded onto the accelerator device, its tokenizer checked against the checkpoint, and
its image preprocessing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmssl.eval.data import Preprocess

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmssl.models.config import TextConfig
    from mmssl.models.io import LogitParams
    from mmssl.models.multimodal import MultimodalModel
    from mmssl.models.text import TextTransformer
    from mmssl.models.vision import VisionEncoder
    from mmssl.tokenizer import Tokenizer


class EvalError(ValueError):
    """Bad evaluation input; the message names the problem (CLIs print it, exit code 2)."""


@dataclass
class Loaded:
    """A model ready to evaluate, with where it came from."""

    model: MultimodalModel
    model_dir: Path
    config: dict[str, Any]
    source: str  # what the user passed (a model or a run directory)

    @property
    def preprocess(self) -> Preprocess:
        """The image preprocessing the model was trained with (size, mean, std); EvalError for a
        model without a vision tower."""
        vision = self.model.cfg.vision
        if vision is None:
            raise EvalError(f"{self.source}: this model has no vision tower")
        pre = self.config.get("preprocess") or {}
        mean, std = pre.get("mean"), pre.get("std")
        from mmssl.models.io import preprocess_size

        # all three were checked when the model was loaded (mmssl.models.io.load_pretrained)
        size = preprocess_size(pre, self.model.cfg, self.model_dir / "config.json")
        return Preprocess(
            size,  # type: ignore[arg-type]  # an int: the model has a vision tower
            tuple(mean) if mean is not None else None,  # type: ignore[arg-type]
            tuple(std) if std is not None else None,  # type: ignore[arg-type]
            **({"max_pixels": pre["max_pixels"]} if pre.get("max_pixels") is not None else {}),
        )

    def checkpoint(self) -> dict[str, Any] | None:
        """{"tag", "manifest_sha256"} of the training checkpoint the model was exported from
        (config.json's "checkpoint", exported_from.json's hash), None for a model saved
        otherwise."""
        tag = self.config.get("checkpoint")
        if not isinstance(tag, str):
            return None
        out: dict[str, Any] = {"tag": tag}
        try:
            origin = json.loads((self.model_dir / "exported_from.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return out
        if isinstance(origin, dict) and origin.get("checkpoint") == tag:
            out["manifest_sha256"] = origin.get("manifest_sha256")
        return out

    @property
    def logit_params(self) -> dict[str, LogitParams]:
        """{objective: learned logit scale and bias} of its clip and siglip objectives."""
        from mmssl.models.io import read_logit_params
        from mmssl.schema import ConfigError

        try:
            return read_logit_params(self.model_dir)
        except ConfigError as err:
            raise EvalError(str(err)) from None

    def tokenizer(self, override: str | None = None) -> Tokenizer:
        """The model's tokenizer, or `override` checked against it (see load_tokenizer)."""
        return load_tokenizer(self.config, self.model_dir, self.model, override)


def vision_tower(model: MultimodalModel) -> VisionEncoder:
    """model.visual; EvalError for a model without one."""
    if model.visual is None:
        raise EvalError("this model has no vision tower")
    return model.visual


def text_tower(model: MultimodalModel) -> TextTransformer:
    """model.text; EvalError for a model without one."""
    if model.text is None:
        raise EvalError("this model has no text tower")
    return model.text


def text_config(model: MultimodalModel) -> TextConfig:
    """model.cfg.text; EvalError for a model without a text tower."""
    if model.cfg.text is None:
        raise EvalError("this model has no text tower")
    return model.cfg.text


def text_width(model: MultimodalModel) -> int:
    """The width E of `model`'s text embeddings (its projection's, else its tower's)."""
    text = text_tower(model)
    return text.proj.out_features if text.proj is not None else text_config(model).dim


def is_exported(path: Path) -> bool:
    """Whether `path` is an exported model dir (config.json and model.safetensors)."""
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _exported_checkpoint(dest: Path, ckpt_dir: Path, tags: list[str]) -> str | None:
    """The tag of the checkpoint of `ckpt_dir` that the export `dest` holds, None unless it
    is still that very checkpoint, its files as exported: a run trained anew in the same
    directory saves other checkpoints under the same tags, so its manifest's sha256 is
    compared, not the tag; a changed or damaged weights file is exported again (an export
    written before mmssl recorded these is redone once)."""
    import json

    from mmssl.tokenizer.base import sha256_file
    from mmssl.train.checkpoint import manifest_digest
    from mmssl.train.export import EXPORT_FILES, SOURCE

    if not is_exported(dest):
        return None
    try:
        source = json.loads((dest / SOURCE).read_text(encoding="utf-8"))
        tag = json.loads((dest / "config.json").read_text(encoding="utf-8")).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(source, dict) or tag not in tags or source.get("checkpoint") != tag:
        return None
    files = source.get("sha256")
    if not isinstance(files, dict) or any(
        files.get(name) != sha256_file(dest / name) for name in EXPORT_FILES
    ):
        return None
    digest = manifest_digest(ckpt_dir / tag)
    return tag if digest is not None and digest == source.get("manifest_sha256") else None


def export_run(run_dir: Path) -> Path:
    """Export the newest good checkpoint of a training run directory to RUN_DIR/export (the
    `mmssl export` default), unless that export already holds it.  A damaged or incomplete
    newer checkpoint is passed over (with a warning), as `checkpoint.resume=auto` does; one
    that a running run rotates away while it is read is replaced by the newest again."""
    try:
        from mmssl.train.export import CheckpointRotated
    except ImportError as err:
        raise EvalError(f"{run_dir}: cannot export a run directory here ({err})") from None
    for attempt in range(3):
        try:
            return _export_newest(run_dir)
        except CheckpointRotated as err:
            if attempt == 2:
                raise EvalError(f"cannot export {run_dir}: {err}") from None
    raise AssertionError("unreachable")  # the last attempt returns or raises


def _export_newest(run_dir: Path) -> Path:
    """One try of `export_run`."""
    from mmssl.schema import ConfigError
    from mmssl.train.checkpoint import latest_tag, list_tags, newest_valid
    from mmssl.train.export import CheckpointRotated
    from mmssl.train.export import export_run as _export

    if not (run_dir / "recipe.yaml").is_file():
        raise EvalError(
            f"{run_dir} is neither an exported model directory (config.json + model.safetensors) "
            f"nor a training run directory (recipe.yaml + checkpoints/)"
        )
    dest = run_dir / "export"
    ckpt_dir = run_dir / "checkpoints"
    tags = list_tags(ckpt_dir)
    if not tags:
        raise EvalError(f"{run_dir}: the run has no checkpoint yet")
    done = _exported_checkpoint(dest, ckpt_dir, tags)
    if done is not None and done == latest_tag(ckpt_dir):
        return dest  # not hashed again: the export verified it
    # nor is it when a newer one is damaged: only those newer ones are checked
    tag = newest_valid(ckpt_dir, "mmssl eval", collective=False, after=done)
    if tag is None:
        if done is not None:
            return dest
        # `mmssl export`'s wording; newest_valid has logged why it skipped each one
        raise EvalError(
            f"{ckpt_dir}: no complete, undamaged checkpoint ({len(tags)} found, each "
            "incomplete or damaged)"
        )
    from safetensors import SafetensorError

    if is_exported(dest):  # of another checkpoint (`mmssl export --tag`, an older step)
        import logging

        logging.getLogger("mmssl.eval").warning(
            "%s holds an export of another checkpoint, or files changed since their export; "
            "replacing it with %s (export elsewhere with `mmssl export %s --out DIR` to keep one)",
            dest,
            tag,
            run_dir,
        )
    try:
        return Path(_export(run_dir, dest, tag, verified=True))  # not hashed twice
    except CheckpointRotated:
        raise
    except (ConfigError, FileNotFoundError) as err:
        raise EvalError(f"cannot export {run_dir}: {err}") from None
    except (OSError, SafetensorError) as err:  # RUN_DIR not writable: export it elsewhere
        raise EvalError(
            f"cannot write {dest} ({err}): export the run elsewhere (mmssl export {run_dir} "
            "--out DIR) and pass --model DIR"
        ) from None


def resolve_model_dir(path: str | Path) -> Path:
    """An exported model directory as is; a run directory -> its latest checkpoint, exported."""
    p = Path(path).expanduser()
    if not p.exists():
        raise EvalError(f"model path not found: {p}")
    if not p.is_dir():
        raise EvalError(f"{p}: expected an exported model directory or a run directory")
    if is_exported(p):
        return p
    return export_run(p)


def load_model(path: str | Path) -> Loaded:
    """Load an exported model (or a run's latest checkpoint) in eval mode, on this rank's
    accelerator device (`mmssl.train.engine.device()`: DeepSpeed's, the CPU without one;
    `_device`).
    The tasks move their inputs to the model's device (`model_device`) and their results
    back to the CPU, where the metrics are computed."""
    from mmssl.models.io import load_pretrained, read_config
    from mmssl.schema import ConfigError

    model_dir = resolve_model_dir(path)
    try:
        config = read_config(model_dir)
        model = load_pretrained(model_dir)
    except (ConfigError, ValueError) as err:
        raise EvalError(str(err)) from None
    model = model.to(_device())
    return Loaded(model=model, model_dir=model_dir, config=config, source=str(path))


def _device() -> torch.device:
    """`mmssl.train.engine.device()` where there may be an accelerator (DS_ACCELERATOR names
    one, or CUDA is present), else the CPU without importing DeepSpeed: its import took
    3.5 s and printed "Setting accelerator to CPU" into every evaluation's stdout."""
    import os

    import torch

    if os.environ.get("DS_ACCELERATOR", "cpu") == "cpu" and not torch.cuda.is_available():
        return torch.device("cpu")
    from mmssl.distributed import local_rank
    from mmssl.train.engine import device

    dev = device()
    # under a launcher, before init_distributed pins this rank's device (`mmssl eval
    # finetune` loads first), the current device is every rank's device 0
    if dev.type != "cpu" and "LOCAL_RANK" in os.environ and dev.index != local_rank():
        dev = torch.device(dev.type, local_rank())
    return dev


def model_device(model: nn.Module) -> torch.device:
    """The device of `model`'s parameters, where its inputs go; the CPU for a model without
    parameters (or a stand-in without `parameters()`, as tests pass)."""
    import torch

    params = getattr(model, "parameters", None)
    for p in params() if params is not None else ():
        return p.device
    return torch.device("cpu")


def load_tokenizer(
    config: dict[str, Any],
    model_dir: Path,
    model: MultimodalModel,
    override: str | None = None,
) -> Tokenizer:
    """The tokenizer of a checkpoint: `override`, else one saved next to the weights, else the
    one its config names, else the default; always checked against the saved metadata."""
    from mmssl.tokenizer import get_tokenizer

    saved = config.get("tokenizer")  # None or a dict (`io.read_config` checks)
    if override is not None:
        choice: str | Path = override
    elif (model_dir / "tokenizer_meta.json").is_file() or (model_dir / "tokenizer.json").is_file():
        choice = model_dir
    elif saved is not None and saved.get("name"):
        choice = saved["name"]
    else:
        choice = "default"
    try:
        tok = get_tokenizer(choice)
    except (FileNotFoundError, ValueError) as err:
        hint = "" if override else "; pass --tokenizer with the one the model was trained with"
        raise EvalError(f"cannot load tokenizer {str(choice)!r}: {err}{hint}") from None
    if saved is not None:
        try:
            tok.check_matches(saved)
        except ValueError as err:
            raise EvalError(
                f"{err} (the checkpoint in {model_dir} was trained with another tokenizer)"
            ) from None
    text = model.cfg.text
    if (
        text is not None
        and override is None  # --tokenizer default: the user's word
        and choice == "default"
        and not (saved or {}).get("name")  # none recorded (an import), or no name in it
        and tok.vocab_size != text.vocab_size
    ):
        # an import (open_clip's 49408 ids) saved without a tokenizer record: the default's
        # 8192 ids fit its table, and every prompt was encoded into other tokens
        raise EvalError(
            f"{model_dir} records no tokenizer and its text tower has vocab_size "
            f"{text.vocab_size}, not the default tokenizer's {tok.vocab_size}: pass --tokenizer "
            "(clip for an open_clip import; default for a model trained with it and a padded "
            "vocabulary), or save the model with "
            "extra={'tokenizer': {'name': ...}}"
        )
    if text is not None and tok.vocab_size > text.vocab_size:
        raise EvalError(
            f"tokenizer {tok.name!r} has {tok.vocab_size} ids but the model's text tower has "
            f"vocab_size {text.vocab_size}: the tokenizer does not match the checkpoint"
        )
    return tok
