"""`mmssl export RUN_DIR [--out DIR] [--tag step_XXXXXXXX]`: a run's checkpoint (any ZeRO
stage) -> `model.safetensors` + `config.json`, loadable with `mmssl.load_encoder`.

ZeRO 1-3 checkpoints are consolidated to fp32 with DeepSpeed's `zero_to_fp32` utilities
(they read the fp32 master partitions of every rank; the frozen parameters of a ZeRO-1
checkpoint, which they leave out, come from its module state); a stage-0 checkpoint holds
the whole module and is read directly.  For a bf16 stage-0 run the module is in bf16, and the fp32
master weights are in its optimizer state without names (`fp32_groups`, or one flat tensor
per group, `fp32_groups_flat`, with DeepSpeed's FusedAdam): the checkpoint's
`fp32_master_names` (saved by mmssl.train.checkpoint) name them, and they replace the bf16
values.  A bf16 stage-0 checkpoint without those names (saved before mmssl wrote them)
exports its bf16 weights, cast to fp32.

The model and the preprocessing in `config.json` come from the run record of the exported
checkpoint (`mmssl_run.json`): the model as the run resolved it, not its config file, which
may have been edited or deleted since, and the recipe, not RUN_DIR/recipe.yaml, which a later
resume may have changed.  Beside it, config.json records the learned logit scale and bias of the
clip and siglip objectives (`logits`: SigLIP's are its loss's, not model weights), which
`mmssl.models.io.read_logit_params` reads back, the prompts of a text-conditioned run
(`condition`, `mmssl.train.text_condition.export_record`), and the run's tokenizer is copied
beside them (`mmssl.tokenizer.save_tokenizer`), which evaluation loads first.  `exported_from.json`
beside them names the checkpoint exactly (the sha256 of its manifest): a run trained anew in
the same directory saves checkpoints of the same tags, so evaluation (`mmssl.eval.loading`)
compares that, not the tag, before it reuses RUN_DIR/export.

The checkpoint's files are checked against its manifest (sha256) first, and every
`torch.load` runs with `weights_only=True` and the allow-list of
`mmssl.train.checkpoint.safe_torch_load`: a checkpoint that would run code is refused.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from mmssl.cliargs import ArgumentParser, summary
from mmssl.schema import ConfigError

_log = logging.getLogger("mmssl.train")

PREFIX = "model."
# {"checkpoint": tag, "manifest_sha256": its manifest's, "run": path, "sha256": {file: sha256}}
SOURCE = "exported_from.json"
EXPORT_FILES = ("config.json", "model.safetensors")  # hashed into SOURCE


def _read_recipe(run_dir: Path, folder: Path) -> Any:
    """The recipe that checkpoint `folder` of `run_dir` was trained with: its run record.

    RUN_DIR/recipe.yaml is the latest attempt's, and a resume may change what the checkpoint
    does not fix (`run_record.RESUME_FIXED` leaves data.image_size, mean and std free), so an
    older checkpoint exported with it would get a later attempt's preprocessing.  Call after
    `verify`: the manifest covers the record."""
    from mmssl.train.checkpoint import RUN_RECORD, CheckpointError
    from mmssl.train.recipe import read_yaml, recipe_from_dict
    from mmssl.train.values import check_values

    run = _read_record(folder)
    if run is not None:
        data = run.get("recipe")
        if not isinstance(data, dict):
            raise CheckpointError(f"checkpoint {folder}: {RUN_RECORD} holds no recipe")
    else:
        # a checkpoint saved before mmssl wrote run records: the run's recipe.yaml is all
        # there is, right unless a later attempt changed its data section
        data = read_yaml(run_dir / "recipe.yaml")
    recipe = recipe_from_dict(data)
    check_values(recipe)  # validated when trained: anything out of range now is damage
    return recipe


def _read_record(folder: Path) -> dict[str, Any] | None:
    """The run record of checkpoint `folder`, None for one saved before mmssl wrote them."""
    from mmssl.train.checkpoint import RUN_RECORD, CheckpointError

    record = folder / RUN_RECORD
    if not record.is_file():
        return None
    try:
        run = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {folder}: {RUN_RECORD} is unreadable ({err})") from None
    if not isinstance(run, dict):
        raise CheckpointError(f"checkpoint {folder}: {RUN_RECORD} is unreadable (not an object)")
    return run


def _read_model(folder: Path, recipe: Any) -> Any:
    """The ModelConfig checkpoint `folder` was trained with: its run record's, since the
    recipe's `model.name` may name a file edited or deleted after training (or a relative
    path, from another working directory).  A checkpoint saved before the record held the
    model: the recipe's model, resolved now.  Call after `verify`."""
    from mmssl.train.checkpoint import RUN_RECORD
    from mmssl.train.recipe import model_config
    from mmssl.train.run_record import recorded_model

    run = _read_record(folder)
    if run is None or run.get("model") is None:
        return model_config(recipe)
    cfg = recorded_model(run["model"], f"checkpoint {folder}: {RUN_RECORD}")
    _check_overrides(cfg, recipe)
    return cfg


def _check_overrides(cfg: Any, recipe: Any) -> None:
    """The recorded recipe's `model.overrides` applied again to the recorded model (which
    holds them already) and checked as `recipe.model_config` checks them: a damaged record
    is refused naming the key, as it was when the model was resolved from them here."""
    from mmssl.models.registry import with_overrides
    from mmssl.schema import to_dict
    from mmssl.train.recipe import override_error

    try:
        with_overrides(to_dict(cfg), recipe.model.overrides)
    except ConfigError as err:
        raise override_error(err) from None
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None


def checkpoint_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The Task's full fp32 state dict from a DeepSpeed checkpoint of any ZeRO stage, after
    checking it against its manifest; CheckpointError if damaged or unsafe."""
    from mmssl.train.checkpoint import CheckpointError, verify

    folder = ckpt_dir / tag
    problem = verify(folder, collective=False)
    if problem:
        raise CheckpointError(f"checkpoint {folder} is not usable: {problem}")
    return _read_state(ckpt_dir, tag)


def _read_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """`checkpoint_state` of a checkpoint already verified against its manifest."""
    import pickle

    from mmssl.train.checkpoint import safe_torch_load, unsafe_error

    folder = ckpt_dir / tag
    try:
        with safe_torch_load():
            if list(folder.glob("*optim_states.pt")):
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
                state = _with_frozen(state, folder)
            else:
                files = sorted(folder.glob("mp_rank_*_model_states.pt"))
                if not files:
                    raise FileNotFoundError(f"{folder}: no DeepSpeed model states")
                saved = torch.load(files[0], map_location="cpu", weights_only=True)
                state = _with_fp32_masters(saved, folder)
    except pickle.UnpicklingError as err:
        raise unsafe_error(folder, err) from None
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _with_frozen(state: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """zero_to_fp32's state with the frozen parameters (train.freeze) it leaves out of a
    ZeRO-1 checkpoint (DeepSpeed records frozen parameters in stage 2-3 checkpoints only),
    from the module state rank 0 saved: below stage 3 it holds every weight whole, a frozen
    one as the run held it (bf16 under precision bf16: it has no fp32 master)."""
    files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not files:
        return state
    module = torch.load(files[0], map_location="cpu", weights_only=True).get("module") or {}
    missing = {k: v for k, v in module.items() if k not in state and v.numel() > 0}
    return {**state, **missing}


def _with_fp32_masters(saved: dict[str, Any], folder: Path) -> dict[str, torch.Tensor]:
    """A stage-0 checkpoint's module state, with the optimizer's fp32 masters in place of
    the bf16 working weights when the checkpoint names them (see the module docstring)."""
    from mmssl.train.checkpoint import CheckpointError

    state = dict(saved["module"])
    names = saved.get("fp32_master_names")
    if names is None:
        return state
    optimizer = saved.get("optimizer") or {}
    groups = optimizer.get("fp32_groups")
    if groups is None and isinstance(optimizer.get("fp32_groups_flat"), list):
        groups = _split_flat(optimizer["fp32_groups_flat"], names, state)
    if not isinstance(groups, list) or [len(g) for g in groups] != [len(g) for g in names]:
        raise CheckpointError(f"{folder}: fp32_master_names do not match the optimizer's groups")
    for group_names, group in zip(names, groups):
        for name, master in zip(group_names, group):
            held = state.get(name)
            if held is None or held.shape != master.shape:
                raise CheckpointError(f"{folder}: fp32 master {name!r} does not match the module")
            for key, value in saved["module"].items():  # a tied weight: every name of it
                if value is held or (value.shape == held.shape and _same_storage(value, held)):
                    state[key] = master
    return state


def _split_flat(
    flats: list[Any], names: list[list[str]], module: dict[str, torch.Tensor]
) -> list[list[torch.Tensor]] | None:
    """FP16_Optimizer's masters, one flat fp32 tensor per group holding its parameters
    concatenated in order, split into tensors shaped as the module's; None if they do not fit."""
    if len(flats) != len(names):
        return None
    groups = []
    for flat, group_names in zip(flats, names):
        if not isinstance(flat, torch.Tensor) or any(n not in module for n in group_names):
            return None
        held = [module[name] for name in group_names]
        sizes = [t.numel() for t in held]
        if flat.dim() != 1 or flat.numel() != sum(sizes):
            return None
        groups.append([p.view(t.shape) for p, t in zip(flat.split(sizes), held)])
    return groups


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    # storage_offset() is typed as a possibly symbolic int; these tensors are concrete
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and (
        int(a.storage_offset()) == int(b.storage_offset()) and a.stride() == b.stride()
    )


def model_state(task_state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, Any]:
    """Keep the `model.` entries of a Task state, in the shapes `model` expects (0-d scalars
    are stored as (1,) in training), with shared-trunk aliases filled in."""
    from mmssl.models.io import aliases

    expected = model.state_dict()
    state = {k[len(PREFIX) :]: v for k, v in task_state.items() if k.startswith(PREFIX)}
    for name, kept in aliases(model).items():
        if name not in state and kept in state:
            state[name] = state[kept]
    for name, value in state.items():
        if name in expected and value.shape != expected[name].shape:
            state[name] = value.reshape(expected[name].shape)
    return state


def export_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    tag: str | None = None,
    *,
    verified: bool = False,
) -> Path:
    """Export the newest good (or `tag`) checkpoint of `run_dir`; returns the output directory.

    verified: the caller has just checked `tag` against its manifest (`newest_valid`), so it
    is not hashed a second time (a checkpoint with its optimizer state can be many GB)."""
    from mmssl.train.checkpoint import newest_valid

    run = Path(run_dir).expanduser()  # "~/runs/a", as --model and load_encoder take it
    if not (run / "recipe.yaml").is_file():
        raise ConfigError(f"{run} is not a run directory (no recipe.yaml)")
    ckpt_dir = run / "checkpoints"
    dest = Path(out).expanduser() if out is not None else run / "export"
    problem = _dest_problem(run, dest)
    if problem:
        raise ConfigError(f"--out {dest} {problem}; export somewhere else")
    for attempt in range(3):
        chosen, checked = tag, verified
        if chosen is None:
            chosen = newest_valid(ckpt_dir, "mmssl export", collective=False)
            if chosen is None:
                raise FileNotFoundError(f"{ckpt_dir}: no complete, undamaged checkpoint")
            checked = True
        try:
            return _export_checkpoint(run, ckpt_dir, chosen, dest, checked)
        except _Rotated as gone:
            # a run still training deleted it (keep_last) while it was read: the newest
            # again, or, for a named tag, say so rather than "no model states"
            if tag is not None or attempt == 2:
                raise CheckpointRotated(
                    f"{gone}: removed while it was being exported (the run is still training "
                    f"and rotated it away: checkpoint.keep_last); export again"
                ) from None
    raise AssertionError("unreachable")  # the last attempt returns or raises


class _Rotated(Exception):
    """The checkpoint being exported was deleted meanwhile."""


class CheckpointRotated(FileNotFoundError):
    """`export_run` of a named checkpoint that a running run deleted while it was read."""


def _export_checkpoint(run: Path, ckpt_dir: Path, tag: str, dest: Path, verified: bool) -> Path:
    """`export_run` of one checkpoint; `_Rotated` when it disappears while being read."""
    from mmssl.atomic import FileLock, write_atomic
    from mmssl.descriptor import PIPELINE_LAYOUT, get_layout
    from mmssl.models.io import save_pretrained
    from mmssl.models.multimodal import MultimodalModel
    from mmssl.tokenizer.base import sha256_file
    from mmssl.train.checkpoint import TAG, manifest_digest
    from mmssl.train.export_records import logit_record, save_tokenizer_copy, tokenizer_record
    from mmssl.train.text_condition import export_record

    # a tag, or a path to one of this run's checkpoints ("step_00000004/" as the shell
    # completes it); a path elsewhere ("../../other/checkpoints/...") names another run's
    where = Path(tag).parent
    if not TAG.fullmatch(Path(tag).name) or (
        where != Path(".") and os.path.realpath(where) != os.path.realpath(ckpt_dir)
    ):
        raise ConfigError(f"--tag {tag!r} is no checkpoint tag (step_XXXXXXXX) of {ckpt_dir}")
    tag = Path(tag).name
    folder = ckpt_dir / tag
    if not folder.is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint {tag}")
    digest = manifest_digest(folder)  # first: what names the checkpoint, before its files
    if digest is None and verified:  # checked complete a moment ago: rotation has begun
        raise _Rotated(str(folder))
    try:
        # verified against its manifest first (newest_valid hashed it already)
        state = _read_state(ckpt_dir, tag) if verified else checkpoint_state(ckpt_dir, tag)
        recipe = _read_recipe(run, folder)
        cfg = _read_model(folder, recipe)
        record = _read_record(folder)
    except Exception:
        if not folder.is_dir() or (digest is not None and manifest_digest(folder) is None):
            raise _Rotated(str(folder)) from None
        raise
    if manifest_digest(folder) != digest:  # gone (or replaced) while it was read
        raise _Rotated(str(folder))
    for tower in (cfg.vision, cfg.text):
        if tower is not None:
            tower.grad_checkpointing = False  # a training-time switch, not part of the export
    model = MultimodalModel(cfg)
    model.load_state_dict(model_state(state, model), strict=True)
    extra: dict[str, Any] = {
        "recipe": recipe.name,
        "checkpoint": tag,
        "descriptor": get_layout(PIPELINE_LAYOUT).to_dict(),
        # the image size and normalisation of training, which evaluation applies
        # (mmssl.eval.loading); data.image_size may differ from the model's own
        "preprocess": {
            "image_size": recipe.data.image_size or (cfg.vision and cfg.vision.image_size),
            "mean": recipe.data.mean,
            "std": recipe.data.std,
            "max_pixels": recipe.data.max_pixels,  # the decoder's limit, which eval keeps
        },
    }
    logits = logit_record(state, recipe)
    if logits:
        extra["logits"] = logits
    if cfg.text is not None:
        # evaluation loads and checks the tokenizer the model was trained with from this
        # record; without it, it fell back to the default tokenizer whatever the run used
        extra["tokenizer"] = tokenizer_record(recipe, record)
        condition = export_record(recipe, cfg.text.context_length)  # its prompts, if any
        extra.update({"condition": condition} if condition else {})
    this_run = os.path.realpath(run)
    source: dict[str, Any] = {"checkpoint": tag, "manifest_sha256": digest, "run": this_run}
    dest.mkdir(parents=True, exist_ok=True)
    # two exports into one folder (two evaluations of a running run) take turns, so that
    # its weights, config and exported_from.json are always one export's
    with FileLock(dest / ".mmssl-export.lock"):
        if (dest / SOURCE).is_file():
            _warn_other_run(dest, this_run)
            # gone before the weights change: it never names a checkpoint they are not from
            (dest / SOURCE).unlink()
        save_tokenizer_copy(dest, extra.get("tokenizer"))
        saved = save_pretrained(model.eval(), dest, extra)
        # evaluation reuses the export only while its files match (mmssl.eval.loading)
        source["sha256"] = {name: sha256_file(dest / name) for name in EXPORT_FILES}
        write_atomic(dest / SOURCE, json.dumps(source, indent=1) + "\n")
    return saved


def _warn_other_run(dest: Path, run: str) -> None:
    """Say so when `dest` holds the export of another run (its exported_from.json names it;
    an export written before mmssl recorded the run names none), which this one replaces."""
    try:
        other = json.loads((dest / SOURCE).read_text(encoding="utf-8")).get("run")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(other, str) and other != run:
        _log.warning("%s held the export of another run (%s), now %s's", dest, other, run)


def _dest_problem(run: Path, dest: Path) -> str | None:
    """Why an export must not be written to `dest`, or None.  Into a run's checkpoints it
    would sit among a save's files, which rotation and a resume's rewrite remove whole; over a
    run directory, `--model RUN_DIR` would take it for the run's export for good."""
    d, r = Path(os.path.realpath(dest)), Path(os.path.realpath(run))
    from mmssl.train.run_lock import is_run_dir

    # this run's checkpoints or another's, as named (RUN/checkpoints may link elsewhere) or real
    named = Path(os.path.abspath(dest))
    for p in (d, *d.parents, named, *named.parents):
        if p.name == "checkpoints" and (p.parent == r or is_run_dir(p.parent)):
            return "is inside a run's checkpoints, which a run removes whole"
    if d == r or is_run_dir(d):
        return "is a run directory (evaluation would take the export for the run)"
    return None


def main(argv: list[str] | None = None) -> int:
    """`mmssl export RUN_DIR [--out DIR --tag TAG]`: exit code 0, or 2 on bad input."""
    p = ArgumentParser(prog="mmssl export", description=summary(__doc__))
    p.add_argument("run_dir", help="a training run directory (holds recipe.yaml, checkpoints/)")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/export)")
    p.add_argument(
        "--tag",
        default=None,
        help="checkpoint tag (default: the newest that matches its manifest; damaged or "
        "incomplete newer ones are skipped with a warning)",
    )
    args = p.parse_args(argv)
    try:
        dest = export_run(args.run_dir, args.out, args.tag)
    except (ConfigError, OSError) as err:  # OSError: --out unwritable, or a file in the way
        print(f"mmssl export: error: {err}", file=sys.stderr)
        return 2
    print(f"mmssl export: wrote {dest / 'model.safetensors'} and {dest / 'config.json'}")
    return 0


if __name__ == "__main__":  # `python -m mmssl.train.export` used to exit 0 doing nothing
    from mmssl.cliargs import tolerant_streams

    tolerant_streams()
    sys.exit(main())
