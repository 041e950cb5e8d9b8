"""`train.init_from`: a run that starts from the weights of an exported model (a warm start).

At step 0 the run loads every tensor of the export (`mmssl export`, `save_pretrained`, an
import saved so) whose name and shape its own model has.  The rest of its model keeps its
initialisation (a tower the export lacks, a conditioner, a projector), and the export's other
tensors are not used; the log names both.  A tensor of one name and another shape is an
error, as is an export that shares no tensor with the model, except for the learned position
tables, which follow the run's sizes as timm and nanoGPT do: the image table is resampled to
another `image_size` (antialiased bicubic, the forward's own resampling), and the text table
is cut to a shorter `context_length` (nanoGPT's crop_block_size; a longer one has no learned
positions to start from).  The optimizer, the LR schedule
and the data start afresh: this is not a resume (`checkpoint.resume` continues a run, with its
optimizer state, and the two are not set together).  A run that started so and then resumes
loads its checkpoint, not the export, which may be gone by then.

The checks read the safetensors header only (names, shapes, dtypes), so `mmssl train
--validate` runs them too; the weights are read once, on every rank, before DeepSpeed builds
its engine (which partitions them under ZeRO-3).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmssl import distributed
from mmssl.schema import ConfigError

_log = logging.getLogger("mmssl.train")


@dataclass
class InitPlan:
    """What a warm start loads: the export's weights file and the tensor names."""

    weights: Path
    loaded: list[str]  # in both, same shape or adapted to the model's
    kept: list[str]  # the model's, left at their initialisation
    unused: list[str]  # the export's, not in the model
    adapted: dict[str, str] = field(default_factory=dict)  # name: what `_adapt` does to it


def init_path(recipe: Any) -> Path | None:
    """train.init_from as a directory: from the working directory, else the recipe's."""
    from mmssl.train.recipe import resolve_path

    value = recipe.train.init_from
    if value is None:
        return None
    path = resolve_path(recipe, value)
    if not path.exists():  # name both places looked (as data.tokenizer's error does)
        looked = value if os.path.isabs(value) else f"{os.path.abspath(value)} or {path}"
        raise ConfigError(f"train.init_from: no exported model directory at {looked}")
    return path


def _export_tensors(path: Path) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """{name: (shape, floating)} of an export's weights (header only), the file, config.json."""
    from safetensors import SafetensorError, safe_open

    from mmssl.models.io import WEIGHTS, read_config

    try:
        record = read_config(path)
    except (FileNotFoundError, ConfigError) as err:
        raise ConfigError(f"train.init_from: {err}") from None
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"train.init_from: {weights}: missing weights file")
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {}
            for name in f.keys():
                part = f.get_slice(name)
                tensors[name] = (tuple(part.get_shape()), part.get_dtype().startswith(("F", "BF")))
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(
            f"train.init_from: {weights}: unreadable or damaged safetensors file ({err})"
        ) from None
    return tensors, weights, record


def plan_init(recipe: Any, cfg: Any) -> InitPlan | None:
    """The warm start of `recipe` (None without train.init_from) for its model config `cfg`,
    checked against the export's header; ConfigError for an export the run cannot start from."""
    path = init_path(recipe)
    if path is None:
        return None
    if recipe.checkpoint.resume not in ("auto", "none"):
        raise ConfigError(
            f"train.init_from ({recipe.train.init_from}) and checkpoint.resume "
            f"({recipe.checkpoint.resume}) both say where the run starts: keep one"
        )
    import torch

    from mmssl.models.io import CARRIED, aliases
    from mmssl.models.multimodal import MultimodalModel

    tensors, weights, record = _export_tensors(path)
    with torch.device("meta"):
        model = MultimodalModel(cfg)
    shared = aliases(model)  # a tied tensor loads through its first name, as exported
    ours = {
        name: (tuple(t.shape), t.is_floating_point())
        for name, t in model.state_dict().items()
        if name not in shared and name not in CARRIED
    }
    common = [name for name in ours if name in tensors]
    kind = {True: "float", False: "integer"}
    adapted = {
        n: how
        for n in common
        if tensors[n] != ours[n] and (how := _adaptation(n, tensors[n], ours[n], model))
    }
    differ_names = [n for n in common if tensors[n] != ours[n] and n not in adapted]
    differ = [
        f"{n}: {tensors[n][0]} {kind[tensors[n][1]]} vs {ours[n][0]} {kind[ours[n][1]]}"
        for n in differ_names
    ]
    where = f"train.init_from: {weights}"
    if differ:
        grows = "text.pos_embed" in differ_names and _longer_context(tensors, ours)
        hint = (
            "; text.context_length may shrink, not grow (the export has no learned positions "
            "past its own)"
            if grows
            else ""
        )
        raise ConfigError(
            f"{where}: {len(differ)} tensors differ in shape or kind (export vs this run's "
            f"model), e.g. {differ[:3]}; model.name and model.overrides must build the "
            f"export's architecture for the tensors it shares{hint}"
        )
    if not common:
        raise ConfigError(
            f"{where} shares no tensor name with this run's model (export {sorted(tensors)[:3]}, "
            f"model {sorted(ours)[:3]}): is it an export of another kind of model?"
        )
    _check_towers(record, cfg, common, where)
    _check_tokenizer(recipe, record, common, where)
    _check_normalisation(recipe, record, common, where)
    kept = [n for n in ours if n not in tensors]
    unused = [n for n in tensors if n not in ours]
    return InitPlan(weights=weights, loaded=common, kept=kept, unused=unused, adapted=adapted)


def _adaptation(name: str, theirs: tuple, ours: tuple, model: Any) -> str | None:
    """How a learned position table of the export's shape becomes the model's (None: it
    cannot): `theirs` and `ours` are (shape, floating)."""
    (shape, floating), (want, _) = theirs, ours
    if not floating or len(shape) != len(want) or shape[-1] != want[-1]:
        return None
    if name == "visual.pos_embed" and len(shape) == 3:
        prefix = model.visual.num_prefix
        side = round((shape[1] - prefix) ** 0.5)
        if side > 0 and side * side == shape[1] - prefix:
            grid = model.visual.grid
            return f"resampled from a {side}x{side} to a {grid}x{grid} grid"
    if name == "text.pos_embed" and len(shape) == 2 and want[0] < shape[0]:
        return f"cut to its first {want[0]} of {shape[0]} positions"
    return None


def _longer_context(tensors: dict[str, Any], ours: dict[str, Any]) -> bool:
    """The run's text table is the export's but for more rows (a longer context_length)."""
    (shape, _), (want, _) = tensors["text.pos_embed"], ours["text.pos_embed"]
    return len(shape) == len(want) == 2 and shape[1] == want[1] and want[0] > shape[0]


def _adapt(name: str, tensor: Any, model: Any) -> Any:
    """`tensor`, the export's `name`, made the model's shape as `_adaptation` said."""
    if name == "visual.pos_embed":
        from mmssl.models.vision import resample_pos_embed

        grid = model.visual.grid
        return resample_pos_embed(tensor, model.visual.num_prefix, grid, grid)
    return tensor[: model.text.cfg.context_length].clone()


def check_init(recipe: Any, cfg: Any) -> None:
    """`validate`'s check of train.init_from, skipped where the run resumes from checkpoints
    of its own (the export is not read then, and may be gone): `plan_init`'s errors.  A
    checkpoint counts once its manifest is written (a save cut short is no resume)."""
    from mmssl.train.checkpoint import MANIFEST, list_tags

    ckpts = Path(recipe.run_dir) / "checkpoints"
    saved = any((ckpts / tag / MANIFEST).is_file() for tag in list_tags(ckpts))
    if recipe.checkpoint.resume != "auto" or not saved:
        plan_init(recipe, cfg)


# tower fields a warm start may change: regularisation, a training-time switch, conditioning
# added to a pretrained tower (zero-initialised: it starts as the tower it conditions), the
# image size and the context length (learned position tables adapted, see `_adaptation`)
FREE = (
    "drop_path",
    "grad_checkpointing",
    "cond_dim",
    "cond_depth",
    "cond_tokens",
    "image_size",
    "context_length",
)


def _differences(theirs: Any, ours: Any, where: str) -> list[str]:
    if isinstance(theirs, dict) and isinstance(ours, dict):
        keys = [k for k in {**theirs, **ours} if k not in FREE]
        return [d for k in keys for d in _differences(theirs.get(k), ours.get(k), f"{where}.{k}")]
    return [] if theirs == ours else [f"{where}: {theirs!r} vs {ours!r}"]


def _check_towers(record: dict[str, Any], cfg: Any, loaded: list[str], where: str) -> None:
    """A tower whose weights load must be the export's architecture: fields that change what
    the weights compute and not their shapes (act, norm_eps, num_heads, pool, causal, ...)
    would load without a word and compute another function."""
    from mmssl.models.config import ModelConfig
    from mmssl.schema import from_dict, to_dict

    theirs = to_dict(from_dict(ModelConfig, record["model"], "model"))  # older exports: defaults
    ours = to_dict(cfg)
    towers = [
        t
        for t, p in (("vision", "visual."), ("text", "text."))
        if any(n.startswith(p) for n in loaded)
    ]
    differ = [
        d for tower in towers for d in _differences(theirs.get(tower), ours.get(tower), tower)
    ]
    if towers and theirs.get("shared_trunk") != ours.get("shared_trunk"):
        # a shared trunk is saved once, under visual.: a text tower of its own stayed random
        differ.append(f"shared_trunk: {theirs.get('shared_trunk')} vs {ours.get('shared_trunk')}")
    if differ:
        raise ConfigError(
            f"{where}: the export's architecture differs where its weights load (export vs "
            f"this run): {'; '.join(differ[:4])}; build it with model.name=<the export "
            "folder> or set those keys in model.overrides"
        )


def _check_tokenizer(recipe: Any, record: dict[str, Any], loaded: list[str], where: str) -> None:
    """Text weights trained with one tokenizer and fed another's ids: refused when both are
    known by their sha256 (an import saved without a tokenizer record is not checked)."""
    from mmssl.train.streams import tokenizer_name, tokenizer_record

    if not any(name.startswith("text.") for name in loaded):
        return
    theirs = (record.get("tokenizer") or {}).get("sha256")
    ours = (tokenizer_record(tokenizer_name(recipe)) or {}).get("sha256")
    if theirs and ours and theirs != ours:
        raise ConfigError(
            f"{where}: its text weights were trained with another tokenizer "
            f"({record['tokenizer'].get('name')}, sha256 {theirs}) than data.tokenizer "
            f"({recipe.data.tokenizer}, sha256 {ours}); token ids would mean other words. Set "
            "data.tokenizer to the export's (its folder holds a copy)"
        )


def _check_normalisation(
    recipe: Any, record: dict[str, Any], loaded: list[str], where: str
) -> None:
    """Image weights trained on inputs normalised one way and fed another's: refused when the
    export records its normalisation (`preprocess.mean`/`std`, None for images in [0, 1]),
    as timm, open_clip and Hugging Face carry theirs with the weights."""
    import math

    pre = record.get("preprocess")
    if not any(n.startswith("visual.") for n in loaded) or not isinstance(pre, dict):
        return
    if "mean" not in pre:  # not recorded (an import saved without it): not checked
        return

    def same(a: Any, b: Any) -> bool:
        if a is None or b is None:
            return a is None and b is None
        return all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b))

    data = recipe.data
    if not (same(pre.get("mean"), data.mean) and same(pre.get("std"), data.std)):
        theirs = f"mean {pre.get('mean')}, std {pre.get('std')}"
        raise ConfigError(
            f"{where}: its image weights were trained on inputs normalised with {theirs} "
            f"(None: images in [0, 1]); this run normalises with mean {data.mean}, std "
            f"{data.std}. Set data.mean and data.std to the export's"
        )


def warn_if_export(recipe: Any) -> None:
    """Log (rank 0) that `model.name` is an export whose weights the run does not load, unless
    train.init_from names where its weights come from: a run so started looked warm-started
    (its record kept the export's path) while it trained from random weights."""
    from mmssl.models.io import WEIGHTS
    from mmssl.models.registry import CONFIG_DIR, config_file

    path = config_file(recipe.model.name)
    weights = path.parent / WEIGHTS
    if path.parent == CONFIG_DIR or not weights.is_file() or recipe.train.init_from is not None:
        return
    if distributed.rank() == 0:
        _log.warning(
            "model.name %s is an export: the run builds its architecture from %s and starts "
            "from random weights; %s is not loaded (train.init_from=%s starts from them)",
            recipe.model.name,
            path,
            weights,
            path.parent,
        )


def _groups(names: list[str]) -> str:
    """Tensor names summarised by their first two name parts, with counts."""
    counts: dict[str, int] = {}
    for name in names:
        key = ".".join(name.split(".")[:2])
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ({n})" for k, n in counts.items()) or "none"


def load_init(model: Any, recipe: Any, cfg: Any) -> InitPlan | None:
    """Load train.init_from's weights into `model` (the run's MultimodalModel, before the
    engine is built); the plan, or None without train.init_from."""
    from safetensors.torch import load_file

    plan = plan_init(recipe, cfg)
    if plan is None:
        return None
    state = load_file(str(plan.weights))
    for name in plan.adapted:
        state[name] = _adapt(name, state[name], model)
    missing, unexpected = model.load_state_dict(
        {name: state[name] for name in plan.loaded}, strict=False
    )
    assert not unexpected and set(missing).isdisjoint(plan.loaded), (missing, unexpected)
    if distributed.rank() == 0:  # a warning (shown) where a part of either was not loaded
        for name, how in plan.adapted.items():
            _log.warning("train.init_from: %s %s", name, how)
        partial = logging.WARNING if plan.kept or plan.unused else logging.INFO
        _log.log(
            partial,
            "train.init_from %s: loaded %d tensors; at their initialisation: %s; not used: %s",
            plan.weights.parent,
            len(plan.loaded),
            _groups(plan.kept),
            _groups(plan.unused),
        )
    return plan
