"""What an export's config.json records beside the model, and the tokenizer copy beside it:
the learned logit scale and bias of the clip and siglip objectives (`logit_record`), the
tokenizer the run trained with (`tokenizer_record`) and its copy (`save_tokenizer_copy`).
The text-conditioning prompts are `mmssl.train.text_condition.export_record`'s."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

_log = logging.getLogger("mmssl.train")


def logit_record(task_state: dict[str, torch.Tensor], recipe: Any) -> dict[str, dict[str, Any]]:
    """{objective: {"type", "logit_scale", "logit_bias"}} of every clip and siglip objective:
    the learned scale as its log (open_clip's `logit_scale`) and siglip's bias, which zero-shot
    probabilities need (sigmoid(exp(logit_scale) * cos + logit_bias)).  SigLIP's are the loss's
    parameters, not the model's, so the weights alone lost them.  CLIP's is the model's
    `logit_scale`, recorded clamped at the objective's max_logit_scale as its loss uses it."""
    import math

    from mmssl.train.export import PREFIX  # the Task's name of the model's parameters

    out: dict[str, dict[str, Any]] = {}
    for key, obj in recipe.objectives.items():
        kind = obj.type or key
        if kind == "siglip":
            scale = task_state.get(f"losses.{key}.logit_scale")
            bias = task_state.get(f"losses.{key}.logit_bias")
            if scale is not None and bias is not None:
                out[key] = {
                    "type": kind,
                    "logit_scale": float(scale.detach()),
                    "logit_bias": float(bias.detach()),
                }
        elif kind == "clip" and f"{PREFIX}logit_scale" in task_state:
            log_scale = min(
                float(task_state[f"{PREFIX}logit_scale"].detach()), math.log(obj.max_logit_scale)
            )
            out[key] = {"type": kind, "logit_scale": log_scale, "logit_bias": None}
    return out


def save_tokenizer_copy(dest: Path, record: dict[str, Any] | None) -> None:
    """Put the run's tokenizer (its file and a tokenizer_meta.json) beside the weights, which
    evaluation loads first (`mmssl.eval.loading.load_tokenizer`): the export then evaluates
    on a machine without the file the run named (a user's path, open_clip's vocabulary).
    The recorded tokenizer already there stays (an earlier export's copy, after the file
    went); a tokenizer gone or changed since the run is not copied (the record names it).
    An earlier export's copy of another tokenizer goes: the meta it wrote and the file that
    names, never the run's own file nor a file no export wrote."""
    from mmssl.tokenizer import META_FILE, SAVED_NAMES, get_tokenizer, read_meta, save_tokenizer

    def loaded(name: str | Path) -> Any:
        try:
            return get_tokenizer(name)
        except (FileNotFoundError, ValueError):
            return None

    want = (record or {}).get("sha256")
    if want and getattr(loaded(dest), "sha256", None) == want:
        return
    source = loaded(record["name"]) if want and record is not None else None
    if source is not None and source.sha256 != want:
        source = None
    try:
        meta = read_meta(dest)
    except ValueError:  # not one an export wrote: left as it is
        meta = None
    if meta is not None and meta["artifact"] in SAVED_NAMES.values():
        for path in (dest / meta["artifact"], dest / META_FILE):
            if source is None or path.resolve() != source.path.resolve():
                path.unlink(missing_ok=True)
    if source is not None:
        with contextlib.suppress(ValueError):  # changed while it was copied: as if gone
            save_tokenizer(source, dest)


def tokenizer_record(recipe: Any, run: dict[str, Any] | None) -> dict[str, Any]:
    """The tokenizer the run trained with, for evaluation to load and check: the metadata
    its run record pinned when training started (`streams.tokenizer_record`: a path by its
    absolute name, its sha256), with a warning when the file there is now another; for a
    checkpoint saved before runs pinned it, `data.tokenizer` as it resolves now.  A tokenizer
    that no longer loads is recorded by name only: evaluation then fails naming it (or takes
    --tokenizer) rather than the export."""
    from mmssl.train.streams import tokenizer_name
    from mmssl.train.streams import tokenizer_record as record_of

    pinned = (run or {}).get("tokenizer")
    if not isinstance(pinned, dict) or not isinstance(pinned.get("name"), str):
        name = tokenizer_name(recipe)
        return record_of(name) or {"name": name}
    now = record_of(pinned["name"])
    if now is None or now.get("sha256") != pinned.get("sha256"):
        _log.warning(
            "the tokenizer %s is %s since the run trained with it (sha256 %s); the export "
            "records the one it trained with, so evaluation refuses that file: it reads the "
            "copy an earlier export put beside the weights, if there is one, else pass "
            "--tokenizer with the tokenizer the run used",
            pinned["name"],
            "gone" if now is None else f"another (sha256 {now.get('sha256')})",
            pinned.get("sha256"),
        )
    return pinned
