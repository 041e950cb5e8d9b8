"""The features file of `mmssl features`: its metadata (model, vision digest, image
preprocessing, label fields), writing and reading it, and its labels as the tasks that
read it (few-shot, linear, zero-shot) take them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mmssl.eval.loading import EvalError, Loaded, vision_tower

if TYPE_CHECKING:
    from mmssl.eval.data import Preprocess
    from mmssl.models.multimodal import MultimodalModel


# a metadata key every features file carries, so that `--out` may replace an earlier one
# but never another file (a model's own model.safetensors is a safetensors file too)
MARKER = "mmssl_features"


def vision_digest(model: MultimodalModel) -> str:
    """sha256 of the vision tower's weights (names, dtypes, shapes, bytes), and of what makes
    the condition its features take without one (`MultimodalModel.image_condition`: a
    backbone conditioned on descriptors or on a prompt reads the conditioner's output too):
    recorded in a features file, so that a task that pairs its embeddings with a model's text
    tower can check they come from the same model."""
    import hashlib

    h = hashlib.sha256()

    def weights(items: Iterable[tuple[str, Tensor]]) -> None:
        for name, t in sorted(items):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())

    visual = vision_tower(model)
    weights(visual.state_dict().items())
    if model.conditioner is not None and (visual.cfg.cond_dim or visual.cfg.cond_tokens):
        # the weights and prompt that make the condition, not its value: a value computed on
        # an accelerator differs from the CPU's in its last bits, and a file extracted on
        # one was refused on the other.  Other models' digests are as before
        h.update(b"condition;")
        prompt = model.cond_prompt
        makers = ("conditioner.", "text.") if prompt is not None else ("conditioner.",)
        weights((n, t) for n, t in model.state_dict().items() if n.startswith(makers))
        if prompt is not None:
            h.update(b"prompt;" + prompt.cpu().to(torch.int64).numpy().tobytes())
    return h.hexdigest()


def preprocess_record(preprocess: Preprocess) -> str:
    """The image preprocessing as a features file records it: JSON {image_size, mean, std}
    (mean and std null when images are not normalised)."""

    def floats(v: tuple[float, ...] | None) -> list[float] | None:
        return None if v is None else [float(x) for x in v]

    return json.dumps(
        {
            "image_size": int(preprocess.image_size),
            "mean": floats(preprocess.mean),
            "std": floats(preprocess.std),
        }
    )


def check_vision_digest(path: str, metadata: dict[str, str], loaded: Loaded) -> None:
    """EvalError unless the features file `path` (with its `metadata`) holds features of the
    loaded model's vision tower on images prepared as it prepares them (`Loaded.preprocess`):
    the same weights on images of another size or normalisation give other features.  A file without
    a digest (hand-written, or from before it was recorded) passes; a file with a digest but
    no preprocessing record (from before that was recorded) cannot be checked and is refused."""
    recorded = metadata.get("vision_sha256")
    if recorded is None:
        return
    if recorded != vision_digest(loaded.model):
        raise EvalError(
            f"{path} holds the features of another vision tower than --model's (extracted "
            f"with {metadata.get('model')}); extract them with this model"
        )
    if "preprocess" not in metadata:
        raise EvalError(
            f"{path} does not record the image preprocessing its features were extracted with "
            "(written by an older mmssl), so it cannot be checked against --model's; extract "
            "them again with `mmssl features`"
        )
    try:
        theirs = json.loads(metadata["preprocess"])
    except ValueError:
        theirs = None
    ours = json.loads(preprocess_record(loaded.preprocess))
    if not isinstance(theirs, dict):
        raise EvalError(
            f"{path}: its preprocessing record {metadata['preprocess']!r} is damaged; extract "
            "the features again with `mmssl features`"
        )
    differ = [
        f"{k} {json.dumps(theirs.get(k))} in the file, {json.dumps(ours[k])} for --model"
        for k in ours
        if theirs.get(k) != ours[k]
    ]
    if differ:
        raise EvalError(
            f"{path} holds features of images prepared otherwise than --model prepares them "
            f"({'; '.join(differ)}; extracted with {metadata.get('model')}): its features "
            "would not match this model's; extract them again with `mmssl features`"
        )


def features_metadata(loaded: Loaded, data: str, fields: Sequence[str]) -> dict[str, str]:
    """The metadata of a features file of `loaded`'s model: the model, the sha256 of its vision
    weights and its preprocessing (which the tasks reading the file check against --model),
    the data and the label fields."""
    return {
        "model": str(loaded.model_dir),
        "vision_sha256": vision_digest(loaded.model),
        "preprocess": preprocess_record(loaded.preprocess),
        "data": data,
        "fields": ",".join(fields),
    }


def save_features(path: str | Path, feats: dict[str, Any], metadata: dict[str, str]) -> None:
    """Write the tensors of `feats` and its keys (JSON in the metadata) to safetensors,
    atomically and readable by others."""
    from mmssl.models.io import save_safetensors

    tensors = {k: v.contiguous() for k, v in feats.items() if isinstance(v, Tensor)}
    meta = dict(metadata, keys=json.dumps(feats["__key__"]))
    meta[MARKER] = "1"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, metadata=meta)


def names_features_file(source: str) -> bool:
    """Whether an evaluation's --train / --test / --data names a features file rather than
    shards: a name ending in .safetensors (any case; a missing one is then an error, not a
    shard pattern), or an existing file that `mmssl features` wrote under another name (it
    was read as a damaged tar shard)."""
    if source.lower().endswith(".safetensors"):
        return True
    return Path(source).is_file() and is_features_file(source)


def is_features_file(path: str | Path) -> bool:
    """Whether `path` is a features file written by mmssl (its metadata has the marker, or,
    from before the marker, the `keys` and `fields` that only `mmssl features` writes)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return False
    return MARKER in meta or {"keys", "fields", "model"} <= set(meta)


def load_features(path: str | Path) -> dict[str, Any]:
    """The tensors of a features file plus `__key__` (list[str]) and `metadata`."""
    from safetensors import safe_open

    out: dict[str, Any] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for name in f.keys():  # noqa: SIM118 -- safe_open is not a mapping
            out[name] = f.get_tensor(name)
    out["__key__"] = json.loads(meta.get("keys", "[]"))
    out["metadata"] = {k: v for k, v in meta.items() if k != "keys"}
    return out


# tensors of every features file that are never labels
NOT_LABELS = ("features", "embeddings", "sample_index")


def label_fields(feats: dict[str, Any]) -> list[str]:
    """The label fields of a loaded features file: those its metadata lists under `fields`
    (the json fields `mmssl features` read from the shards).  A file without that record
    (written by hand or before it existed) offers every tensor except features, embeddings
    and sample_index."""
    meta = feats.get("metadata", {})
    if "fields" in meta:
        return [f for f in meta["fields"].split(",") if f]
    return sorted(k for k in feats if k not in (*NOT_LABELS, "__key__", "metadata"))


def integer_labels(labels: Tensor, source: str, field: str, keys: list[str]) -> Tensor:
    """labels (N,) as int64; EvalError naming `source`, `field` and the first sample (its key
    from `keys`, else its row) whose value is not a whole number: `.long()` would make 2.5
    class 2 without a word, and a whole number beyond int64 any class."""
    if labels.is_floating_point():
        labels = labels.double()
        fits = (labels >= -(2.0**63)) & (labels < 2.0**63)
        whole = torch.isfinite(labels) & (labels == labels.round()) & fits
        bad = torch.nonzero(~whole).flatten()
        if len(bad):
            i = int(bad[0])
            where = f"sample {keys[i]!r}" if i < len(keys) else f"row {i}"
            raise EvalError(
                f"{source}: {field!r} is {labels[i].item()} at {where}; labels must be "
                "whole class indices"
            )
    return labels.long()


def file_labels(
    path: str, feats: dict[str, Any], field: str, rows: str, limit: int | None
) -> Tensor:
    """The first `limit` int64 labels (N,) of `field` in the loaded features file `path`, one
    per row of its `rows` tensor; EvalError unless `field` is one of its label fields
    (`label_fields`) with whole-number values."""
    fields = label_fields(feats)
    if field not in fields or field not in feats:
        listed = ", ".join(f for f in fields if f in feats) or "none"
        raise EvalError(
            f"{path} has no {field!r} labels (its label fields: {listed}); this task needs "
            "labelled data (pass --label-field to name another field)"
        )
    y, n = feats[field], len(feats[rows])
    if y.shape != (n,):
        raise EvalError(
            f"{path}: {field!r} has shape {tuple(y.shape)} but there are {n} feature rows"
        )
    return integer_labels(y[:limit], path, field, feats["__key__"])
