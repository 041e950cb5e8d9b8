"""Exported models on disk: `model.safetensors` + `config.json`; loading never unpickles."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmssl.atomic import replace_together, temp_name
from mmssl.models.config import ModelConfig, check_values
from mmssl.models.multimodal import MultimodalModel
from mmssl.schema import ConfigError, from_dict, read_json_config, suggest, to_dict

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# what save_pretrained's caller (`mmssl export`) records in config.json beside "model"
EXTRA_SECTIONS = (
    "recipe",
    "checkpoint",
    "descriptor",
    "preprocess",
    "logits",
    "tokenizer",
    "condition",
)
SECTIONS = ("model", *EXTRA_SECTIONS)  # config.json's sections
PREPROCESS = ("image_size", "mean", "std", "max_pixels")
TOKENIZER = ("name", "kind", "vocab_size", "bos_id", "eos_id", "pad_id", "sha256")  # .metadata
LOGITS = ("type", "logit_scale", "logit_bias")
CARRIED = ("cond_prompt", "visual.cond_default")  # `mmssl.models.carried`: saved while set


def aliases(model: nn.Module) -> dict[str, str]:
    """State-dict names that alias an earlier name's tensor (a shared trunk appears under both
    towers) -> that earlier name."""
    first: dict[int, str] = {}
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        # a model built on the meta device has no addresses: its shared tensors are one object
        ptr = id(tensor) if tensor.is_meta else tensor.data_ptr()
        if tensor.numel() and ptr in first:
            out[name] = first[ptr]
        else:
            first.setdefault(ptr, name)
    return out


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (safetensors refuses aliased tensors).

    A MultimodalModel's 0-d parameters (logit scale and bias) that a training Task holds as
    (1,) (`mmssl.train.zero3.promote_scalar_params`, in place) are written 0-d again, as its
    config builds them: a model saved after a Task was built on it wrote an export that
    `load_pretrained` refused ("logit_scale: (1,) vs ()")."""
    skip = aliases(model)
    scalars: set[str] = set()
    if isinstance(model, MultimodalModel):
        with torch.device("meta"):
            scalars = {n for n, t in MultimodalModel(model.cfg).state_dict().items() if not t.dim()}
    state = {}
    for name, tensor in model.state_dict().items():
        if name not in skip:
            if name in scalars and tensor.shape == (1,):
                tensor = tensor.reshape(())
            state[name] = tensor.detach().contiguous().cpu()
    return state


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc, since 4.7):
    setting it to read it would give files that other threads create meanwhile mode 0666."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(mask)
    return mask


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """save_file, with the mode a plain open() gives (0o666 & ~umask): safetensors creates its
    files 0600, which others on a shared machine cannot read."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:  # a full disk, a file size limit: an OSError as any write's
        raise OSError(f"cannot write {path}: {err}") from None
    os.chmod(path, 0o666 & ~_umask())


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically: a failed write leaves any old file as it was."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        write_safetensors(tensors, tmp, metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_pretrained(
    model: MultimodalModel, out_dir: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write `model.safetensors` and `config.json` ({"model": ModelConfig, **extra}) to out_dir.
    `model` is a whole MultimodalModel; anything else (one tower) is a TypeError.

    extra holds config.json's other sections, each optional: "recipe" (the run's recipe
    name), "checkpoint" (its tag), "descriptor" (the augmentation descriptor layout),
    "preprocess" (keys "image_size", "mean", "std", "max_pixels": what evaluation applies), "logits" (the
    contrastive objectives' logit scale and bias) and "tokenizer" (its metadata).  Any other
    key, "model" included, any other "preprocess" key, and a value the loaders refuse (an
    unknown descriptor layout, a mean without its std, an image size off the patch grid, ...:
    `check_record`) is a ConfigError naming it, raised before anything is written.

    Both are written under temporary names first and renamed into place only once both are
    complete (`replace_together`), so a failure while writing leaves the old files (if any)
    as they were.  The old config.json goes first and the new one comes last: an interruption
    between the renames leaves a folder without config.json, which no loader takes for an
    export, never new weights beside an old config."""
    out = Path(out_dir).expanduser()
    if not isinstance(model, MultimodalModel):
        # a tower (what load_encoder returns) has a config that is no ModelConfig: its export
        # would not load, and would replace a good one in place
        raise TypeError(
            f"save_pretrained({str(out)!r}) needs the whole MultimodalModel, got "
            f"{type(model).__name__}; pass load_encoder(path, tower='model') (or "
            f"load_pretrained(path)), not one tower; nothing was written"
        )
    check_record(extra or {}, f"save_pretrained({str(out)!r}) extra", EXTRA_SECTIONS, model.cfg)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    targets = [out / WEIGHTS, out / CONFIG]
    for target in targets:
        if target.exists() and not target.is_file():
            raise FileExistsError(f"{target} exists and is not a file; nothing was written")
    try:  # before anything is written: a numpy float in `extra` left an empty folder
        config = json.dumps({"model": to_dict(model.cfg), **(extra or {})}, indent=2) + "\n"
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"save_pretrained({str(out)!r}) extra: {err}; pass plain Python values (float, "
            "int, str, list, dict); nothing was written"
        ) from None
    out.mkdir(parents=True, exist_ok=True)
    state = unique_state_dict(model)
    replace_together(
        [
            (targets[0], lambda tmp: write_safetensors(state, tmp, metadata={"format": "pt"})),
            (targets[1], config),
        ]
    )
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    """The config.json of an exported model directory, with a clear error if it is unusable."""
    path = Path(path).expanduser()  # "~/models/x", as the CLI's --model takes it
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        if (Path(path) / "recipe.yaml").is_file():
            raise FileNotFoundError(
                f"{path} is a training run directory, not an exported model: run "
                f"`mmssl export {path}` and load {Path(path) / 'export'}"
            )
        raise FileNotFoundError(f"{cfg_path}: no config.json (is {path} an exported model?)")
    data = read_json_config(cfg_path)
    if not isinstance(data, dict) or "model" not in data:
        raise ConfigError(f"{cfg_path}: missing the 'model' section")
    check_record(data, cfg_path)
    return data


def check_record(
    record: dict[str, Any],
    where: str | Path,
    known: tuple[str, ...] = SECTIONS,
    cfg: ModelConfig | None = None,
) -> None:
    """ConfigError for a config.json record (`where` starts the message) that loading would
    refuse: an unknown key (`check_sections`), a bad descriptor, preprocess, tokenizer or
    logits section and, given the model's `cfg`, its values (`check_model_config`) and a
    preprocess.image_size it cannot take.  read_config runs these on a file (load_pretrained
    again with its model's config), save_pretrained before it writes."""
    check_sections(record, where, known)
    _check_descriptor(record.get("descriptor"), where)
    _check_preprocess(record.get("preprocess"), where)
    _check_tokenizer(record.get("tokenizer"), where)
    _logit_params(record, where)
    if cfg is not None:
        condition_prompts(record.get("condition"), where, cfg)
        check_model_config(cfg, str(where))
        preprocess_size(record.get("preprocess"), cfg, where)


def check_sections(
    record: dict[str, Any], where: str | Path, known: tuple[str, ...] = SECTIONS
) -> None:
    """ConfigError naming the first unknown key of a config.json record (`where` starts the
    message): a section not in `known`, or a "preprocess" key not in PREPROCESS.  What
    read_config refuses, save_pretrained refuses to write."""
    _check_keys(record, known, "", where)
    if isinstance(record.get("preprocess"), dict):
        _check_keys(record["preprocess"], PREPROCESS, "preprocess.", where)


def _check_keys(
    record: dict[str, Any], known: tuple[str, ...], prefix: str, cfg_path: str | Path
) -> None:
    """ConfigError naming the first key of `record` not in `known`: a misspelt section was
    ignored, and its default used without a word."""
    for key in record:
        if key not in known:
            raise ConfigError(
                f"{cfg_path}: unknown key {f'{prefix}{key}'!r}{suggest(str(key), known)}; "
                f"known: {', '.join(known)}"
            )


def _check_preprocess(record: Any, cfg_path: str | Path) -> None:
    """ConfigError unless config.json's "preprocess" (the image size and normalisation of
    training, which evaluation applies) is absent or an object (its keys are
    `check_sections`') whose mean/std are both given or both absent, 3 finite numbers each
    on the images' [0, 1] scale (`mmssl.data.args.check_norm`)."""
    from mmssl.data.args import check_norm
    from mmssl.data.errors import DataError

    if record is None:
        return
    if not isinstance(record, dict):
        raise ConfigError(f"{cfg_path}: 'preprocess' must be an object, got {record!r}")
    try:
        check_norm(record.get("mean"), record.get("std"), "preprocess.")
    except DataError as err:
        raise ConfigError(f"{cfg_path}: {err}") from None
    limit = record.get("max_pixels")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(
            f"{cfg_path}: preprocess.max_pixels must be a positive integer, got {limit!r}"
        )


def preprocess_size(record: Any, cfg: ModelConfig, cfg_path: str | Path) -> int | None:
    """The image size evaluation prepares images at: config.json's preprocess.image_size (the
    size training ran at), else the vision tower's own; None without a vision tower.
    ConfigError unless it is a positive multiple of the patch size."""
    if cfg.vision is None:
        return None
    size = (record or {}).get("image_size")
    size = cfg.vision.image_size if size is None else size
    patch = cfg.vision.patch_size
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % patch:
        raise ConfigError(
            f"{cfg_path}: preprocess.image_size {size!r} is not a positive multiple of the "
            f"patch size {patch}"
        )
    return size


def condition_prompts(record: Any, cfg_path: str | Path, cfg: ModelConfig) -> dict[str, list[int]]:
    """{source: prompt ids} of config.json's "condition": the prompt that a text-conditioned
    model's training conditioned each source's images on (`mmssl.train.text_condition.
    export_record`); {} without one.  ConfigError for a record that is not {"prompts":
    {source: {"text": str, "ids": [ids in the vocabulary]}}} of a model conditioned on text."""
    if record is None:
        return {}
    text_model = cfg.condition is not None and cfg.condition.source == "text"
    prompts = record.get("prompts") if isinstance(record, dict) else None
    if not text_model or not isinstance(prompts, dict) or not prompts:
        raise ConfigError(
            f"{cfg_path}: 'condition' must be {{'prompts': {{source: {{'text', 'ids'}}}}}} of a "
            f"model conditioned on text, got {record!r}"
        )
    _check_keys(record, ("prompts",), "condition.", cfg_path)
    vocab = cfg.text.vocab_size if cfg.text is not None else 0
    for source, prompt in prompts.items():
        ids = prompt.get("ids") if isinstance(prompt, dict) else None
        text = prompt.get("text") if isinstance(prompt, dict) else None
        if not (
            isinstance(ids, list)
            and ids
            and isinstance(text, str)
            and all(type(i) is int and 0 <= i < vocab for i in ids)
        ):
            raise ConfigError(
                f"{cfg_path}: condition.prompts.{source} must be {{'text': str, 'ids': [ids in "
                f"0..{vocab - 1}]}}, got {prompt!r}"
            )
        _check_keys(prompt, ("text", "ids"), f"condition.prompts.{source}.", cfg_path)
    return {source: prompt["ids"] for source, prompt in prompts.items()}


def _set_cond_prompt(model: MultimodalModel, prompts: dict[str, list[int]], where: Path) -> None:
    """cond=None of a text-conditioned model: the prompt its training conditioned every image
    on (`MultimodalModel.image_condition`); with a prompt per source, the unconditioned path,
    which training never ran, and a warning."""
    distinct = {tuple(ids) for ids in prompts.values()}
    if len(distinct) == 1:
        model.cond_prompt = torch.tensor([list(distinct.pop())])
    elif distinct:
        warnings.warn(
            f"{where}: trained with a prompt per source ({', '.join(sorted(prompts))}), so "
            "cond=None runs the vision tower unconditioned, as training never did; condition "
            "it on a source's prompt with model.condition(cond_text=ids)",
            stacklevel=3,
        )


def _check_tokenizer(record: Any, cfg_path: str | Path) -> None:
    """ConfigError unless config.json's "tokenizer" (`Tokenizer.metadata`, with the name it
    loads by if not the default, which evaluation loads and checks) is absent or an object
    whose name, if any, is a string: another value was ignored, and evaluation fell back to
    the default tokenizer without a check."""
    if record is None:
        return
    if not isinstance(record, dict) or not isinstance(record.get("name", ""), str):
        raise ConfigError(
            f"{cfg_path}: 'tokenizer' must be an object (Tokenizer.metadata, with a string "
            f"'name' unless the default), got {record!r}"
        )
    _check_keys(record, TOKENIZER, "tokenizer.", cfg_path)  # a misspelt name: the default


def _check_descriptor(record: Any, cfg_path: str | Path) -> None:
    """ConfigError unless config.json's "descriptor" (the augmentation descriptor layout the
    model was trained with: `DescriptorLayout.to_dict()`, or just its version) is absent or a
    layout this version of mmssl knows, as it knows it: a later layout would be read with
    v1's meaning."""
    from mmssl.descriptor import LAYOUTS

    if record is None:
        return  # saved by save_pretrained alone, not by `mmssl export`
    version = record.get("version") if isinstance(record, dict) else record
    if not isinstance(version, str):
        raise ConfigError(f"{cfg_path}: 'descriptor' has no layout version: {record!r}")
    if version not in LAYOUTS:
        raise ConfigError(
            f"{cfg_path}: unknown augmentation descriptor layout {version!r} (this mmssl "
            f"knows {', '.join(sorted(LAYOUTS))}); a newer mmssl exported it"
        )
    if isinstance(record, dict) and record != LAYOUTS[version].to_dict():
        raise ConfigError(
            f"{cfg_path}: 'descriptor' {version} does not match layout {version}: "
            f"{LAYOUTS[version].describe()}"
        )


@dataclass(frozen=True)
class LogitParams:
    """The learned logit scale and bias of a contrastive objective, as exported."""

    type: str  # "clip" (softmax over the texts) or "siglip" (a sigmoid per pair)
    logit_scale: float  # log of the multiplier, as open_clip's `logit_scale`
    logit_bias: float | None  # siglip's; None for clip

    def logits(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """image_emb (N, E), text_emb (M, E) -> (N, M) exp(logit_scale) * cos + logit_bias."""
        cos = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T
        return math.exp(self.logit_scale) * cos + (self.logit_bias or 0.0)

    def probabilities(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """(N, M): siglip's sigmoid of each pair's logit, clip's softmax over the M texts."""
        logits = self.logits(image_emb, text_emb)
        return logits.sigmoid() if self.type == "siglip" else logits.softmax(-1)


def read_logit_params(path: str | Path) -> dict[str, LogitParams]:
    """{objective: LogitParams} of every clip and siglip objective an exported model was
    trained with (config.json "logits"); {} for an export without them."""
    return _logit_params(read_config(path), Path(path) / CONFIG)


def _logit_params(data: dict[str, Any], cfg_path: str | Path) -> dict[str, LogitParams]:
    record = data.get("logits", {})
    if not isinstance(record, dict):
        raise ConfigError(f"{cfg_path}: 'logits' must be an object, got {record!r}")
    out = {}
    for key, entry in record.items():
        where = f"{cfg_path}: logits.{key}"
        if not isinstance(entry, dict) or entry.get("type") not in ("clip", "siglip"):
            raise ConfigError(f"{where} must be an object with type 'clip' or 'siglip'")
        _check_keys(entry, LOGITS, f"logits.{key}.", cfg_path)
        scale: Any = entry.get("logit_scale")
        bias: Any = entry.get("logit_bias")
        for name, value in (("logit_scale", scale), ("logit_bias", bias)):
            if value is None and (name == "logit_scale" or entry["type"] == "siglip"):
                raise ConfigError(f"{where}.{name} is missing")
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ConfigError(f"{where}.{name} must be a finite number, got {value!r}")
        out[key] = LogitParams(entry["type"], float(scale), None if bias is None else float(bias))
    return out


def check_model_config(cfg: ModelConfig, where: str) -> None:
    """mmssl.models.config.check_values for a config read from a file (JSON reads NaN and
    Infinity): the ConfigError names `where` and the key."""
    try:
        check_values(cfg)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def load_pretrained(path: str | Path) -> MultimodalModel:
    """Rebuild the model of an exported directory and load its weights (strict)."""
    path = Path(path).expanduser()
    data = read_config(path)
    cfg_path = Path(path) / CONFIG
    try:
        cfg = from_dict(ModelConfig, data["model"], "model")
    except ConfigError as err:
        raise ConfigError(f"{cfg_path}: {err}") from None
    check_record(data, cfg_path, cfg=cfg)  # the model's values and its preprocess size
    # the checks below run on a model without storage: a config.json edited to a huge model
    # beside small weights took 12.8 GB and a minute to build before its shapes failed
    with torch.device("meta"):
        model = MultimodalModel(cfg)
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing weights file")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights}: unreadable or damaged safetensors file ({err})") from None
    for name, kept in aliases(model).items():
        if kept in state:
            state[name] = state[kept]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    # the conditions cond=None stands for, saved while set (a fine-tuned tower put back, a
    # model saved after load_pretrained): load_state_dict checks and sets them
    unexpected = sorted(set(state) - set(expected) - set(CARRIED))
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    # checked here: load_state_dict would raise a RuntimeError listing every tensor, and would
    # quietly cast integer tensors into float parameters
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    kinds = [
        f"{k}: {state[k].dtype} vs {v.dtype}"
        for k, v in expected.items()
        if state[k].is_floating_point() != v.is_floating_point()
    ]
    if shapes or kinds:
        what = "shapes (file vs config)" if shapes else "dtypes (file vs model)"
        items = shapes or kinds
        raise ValueError(
            f"{weights} does not match {cfg_path}: {len(items)} tensors differ in {what}, "
            f"e.g. {items[:3]}"
        )
    model = MultimodalModel(cfg)
    model.load_state_dict(state)
    _set_cond_prompt(model, condition_prompts(data.get("condition"), cfg_path, cfg), cfg_path)
    return model.eval()


def load_encoder(path: str | Path, tower: str = "vision") -> nn.Module:
    """One tower of an exported model, in eval mode ('vision', 'text' or 'model')."""
    if tower not in ("vision", "text", "model"):
        raise ValueError(f"tower must be 'vision', 'text' or 'model', got {tower!r}")
    model = load_pretrained(path)
    if tower == "model":
        return model
    if tower == "vision":  # cond=None as the whole model's (`standalone_vision`)
        return model.standalone_vision(copy=False).eval()  # the model is dropped
    return model._tower(tower).eval()
