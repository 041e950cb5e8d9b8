"""Zero-shot classification: class embeddings from prompt templates, cosine to image embeddings.

A class embedding is the mean of its L2-normalised prompt embeddings, normalised again
(CLIP's prompt ensembling).  Classes come from a JSON file `{"classnames": [...],
"templates": ["a photo of a {}.", ...], "field": "label"}` (optionally `"prompts"`: one
list of rendered prompts per class instead of templates, refused beside templates unless it
is those templates rendered; without `"field"` the class index is read from `label`) or from
the built-in demo sets `digit` and `color`.  Every prompt must fit the text tower's context,
its start and end tokens included.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmssl.eval.features_file import names_features_file
from mmssl.eval.loading import EvalError, Loaded, text_config, text_width
from mmssl.eval.metrics import confusion_matrix, per_class_accuracy, predictions, topk_accuracy
from mmssl.eval.retrieval import embed_texts

if TYPE_CHECKING:
    from mmssl.models.multimodal import MultimodalModel

BUILTIN = ("digit", "color")


@dataclass
class ClassSpec:
    """Class names and, per class, the prompts whose embeddings are averaged."""

    classnames: list[str]
    prompts: list[list[str]]
    field: str = "label"


def _show(value: Any) -> str:
    """A JSON value as the file has it (null, not None), for a message."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _not_string_list(value: Any) -> str | None:
    """Why `value` is not a list of strings, or None if it is one."""
    if not isinstance(value, list):
        kind = "string" if isinstance(value, str) else type(value).__name__
        return f"got a {kind} ({_show(value)})"
    for i, item in enumerate(value):
        if not isinstance(item, str):
            return f"item {i} is {_show(item)}"
    return None


def render_templates(classnames: list[str], templates: list[str]) -> list[list[str]]:
    """Fill `{}` of every template with every class name; EvalError on bad input."""
    if not classnames:
        raise EvalError("the class list is empty: zero-shot needs at least one class name")
    # a bare string was read character by character: "template 'a' has no '{}' placeholder"
    problem = _not_string_list(templates)
    if problem:
        raise EvalError(f"templates must be a list of strings; {problem}")
    if not templates:
        raise EvalError(
            "the template list is empty: give at least one template such as 'a photo of a {}.'"
        )
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise EvalError(f"template {t!r} has no '{{}}' placeholder for the class name")
    check_classnames(classnames)
    # str.replace, not format: a template may hold other braces
    return [[t.replace("{}", c) for t in templates] for c in classnames]


def check_classnames(classnames: list[str]) -> None:
    """EvalError unless every class name is a non-empty string and none repeats (the
    per-class results are keyed by name: a repeat would hide a class)."""
    for c in classnames:
        if not isinstance(c, str) or not c.strip():
            raise EvalError(f"class name {c!r} is not a non-empty string")
    if len(set(classnames)) != len(classnames):
        dup = sorted({c for c in classnames if classnames.count(c) > 1})
        raise EvalError(f"class names repeat: {dup}")


def builtin_classes(name: str) -> ClassSpec:
    """The demo's digit (field `digit`) or colour (field `color`) classes with their prompts."""
    from mmssl.data.captions import class_prompts

    if name not in BUILTIN:
        raise EvalError(f"unknown built-in class set {name!r}; choose from {', '.join(BUILTIN)}")
    return ClassSpec(*class_prompts(name), name)


def load_classes(source: str, templates_file: str | None = None) -> ClassSpec:
    """A ClassSpec from a built-in name or a JSON file; `templates_file` (a JSON list)
    replaces the file's templates."""
    if source in BUILTIN and not Path(source).exists():
        spec = builtin_classes(source)
        if templates_file is None:
            return spec
        return ClassSpec(
            spec.classnames,
            render_templates(spec.classnames, _read_list(templates_file)),
            spec.field,
        )
    data = _read_json(source)
    if isinstance(data, list):
        data = {"classnames": data}
    if not isinstance(data, dict) or "classnames" not in data:
        raise EvalError(
            f"{source}: expected a JSON list of class names or an object with 'classnames'"
        )
    classnames = data["classnames"]
    if not isinstance(classnames, list):
        raise EvalError(f"{source}: 'classnames' must be a list")
    field = data.get("field", "label")
    if not isinstance(field, str) or not field:
        # str() made null the field 'None': "have no 'None' field" from the data, later
        raise EvalError(
            f"{source}: 'field' must be a non-empty string naming the json field that holds "
            f"the class index (leave it out for 'label'), got {_show(field)}"
        )
    if templates_file is not None:
        return ClassSpec(
            classnames, render_templates(classnames, _read_list(templates_file)), field
        )
    if "templates" in data:
        problem = _not_string_list(data["templates"])
        if problem:
            raise EvalError(f"{source}: 'templates' must be a list of strings; {problem}")
        rendered = render_templates(classnames, data["templates"])
        if "prompts" in data and data["prompts"] != rendered:
            # the templates won and edited prompts were dropped without a word; the demo's
            # files carry both, the prompts rendered from the templates, and load as before
            raise EvalError(
                f"{source} has both 'templates' and 'prompts', and the prompts are not the "
                "templates filled with the class names: remove 'templates' to use the prompts, "
                "or 'prompts' to use the templates"
            )
        return ClassSpec(classnames, rendered, field)
    if "prompts" in data:
        prompts = data["prompts"]
        if not classnames:
            raise EvalError(f"{source}: the class list is empty")
        if (
            not isinstance(prompts, list)
            or len(prompts) != len(classnames)
            or not all(
                isinstance(p, list) and p and all(isinstance(s, str) for s in p) for p in prompts
            )
        ):
            raise EvalError(
                f"{source}: 'prompts' must hold one non-empty list of strings per class"
            )
        check_classnames(classnames)
        return ClassSpec(classnames, prompts, field)
    return ClassSpec(classnames, render_templates(classnames, ["a photo of a {}."]), field)


def _read_json(path: str, what: str = "class file") -> Any:
    p = Path(path)
    if not p.is_file():
        builtin = f" (or use a built-in: {', '.join(BUILTIN)})" if what == "class file" else ""
        raise EvalError(f"{what} not found: {path}{builtin}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalError(f"{path}: not valid JSON ({err})") from None


def _read_list(path: str) -> list[str]:
    """--templates: a JSON list given inline (`'["a photo of a {}."]'`) or in a file (a list,
    or an object with "templates")."""
    if path.lstrip().startswith("["):
        try:
            data = json.loads(path)
        except json.JSONDecodeError as err:
            raise EvalError(f"--templates {path!r}: not a valid JSON list ({err})") from None
    else:
        data = _read_json(path, "templates file")
    if isinstance(data, dict):
        data = data.get("templates")
    if not isinstance(data, list):
        raise EvalError(f"{path}: expected a JSON list of templates")
    problem = _not_string_list(data)
    if problem:
        raise EvalError(f"{path}: templates must be a list of strings; {problem}")
    return data


@torch.no_grad()
def class_embeddings(
    model: MultimodalModel, tokenizer: Any, prompts: list[list[str]], batch_size: int = 256
) -> Tensor:
    """(C, E) L2-normalised class embeddings, on the CPU: the renormalised mean over each
    class's prompts.

    EvalError if a prompt (with its start and end tokens) is longer than the text context:
    cut to it, prompts that differ only past the cut become one token row, and classes
    that cannot be told apart score without a word."""
    flat = [p for ps in prompts for p in ps]
    context_length = text_config(model).context_length
    batches = [
        _encode_prompts(tokenizer, flat[i : i + batch_size], context_length)
        for i in range(0, len(flat), batch_size)
    ]
    too_long = [p for batch in batches for p in batch[2]]
    if too_long:
        _refuse_long_prompts(tokenizer, too_long, len(flat), context_length)
    embs = [embed_texts(model, ids, mask).cpu() for ids, mask, _ in batches]
    emb = torch.cat(embs)  # (P, E), on the CPU
    out, start = [], 0
    for ps in prompts:
        out.append(emb[start : start + len(ps)].mean(0))
        start += len(ps)
    return F.normalize(torch.stack(out), dim=-1)


def _encode_prompts(
    tokenizer: Any, texts: list[str], context_length: int
) -> tuple[Tensor, Tensor | None, list[str]]:
    """(ids, mask) of `texts` as `batch_encode(texts, context_length)` gives them, and the
    texts it would cut.  Encoded one token wider: a row that reaches the extra column is
    longer than the context; when none does, dropping that column (padding) leaves exactly
    the rows of the narrower call."""
    ids, mask = tokenizer.batch_encode(texts, context_length + 1)
    if mask is None:  # a tokenizer without a mask (ids only): nothing to measure with, and
        return (*tokenizer.batch_encode(texts, context_length), [])  # its own cut kept
    cut = mask[:, context_length:].any(1).tolist()
    return ids[:, :context_length], mask[:, :context_length], [t for t, c in zip(texts, cut) if c]


def _refuse_long_prompts(
    tokenizer: Any, too_long: list[str], total: int, context_length: int
) -> None:
    """EvalError naming the longest of `too_long` and its token count (start and end tokens
    included, as batch_encode adds them)."""
    if hasattr(tokenizer, "encode"):
        counts = {p: len(tokenizer.encode(p, add_bos=True, add_eos=True)) for p in too_long}
        longest = max(too_long, key=lambda p: counts[p])
        size = f"{counts[longest]} tokens"
    else:
        longest, size = max(too_long, key=len), f"more than {context_length} tokens"
    raise EvalError(
        f"prompt {longest!r} is {size} (start and end tokens included), longer than the "
        f"text context of {context_length} tokens ({len(too_long)} of {total} prompts are): "
        "cut to fit, prompts that differ only past the cut would give their classes the same "
        "embedding; shorten the template (or the prompts / class names)"
    )


def score(
    image_emb: Tensor, class_emb: Tensor, labels: Tensor, classnames: list[str]
) -> dict[str, Any]:
    """image_emb (N, E), class_emb (C, E) (both normalised), labels (N,) -> metrics."""
    c = len(classnames)
    labels = torch.as_tensor(labels).long()
    # metrics.topk_accuracy would raise a bare ValueError for these, deep in the scoring
    if labels.numel() == 0:
        raise EvalError("zero-shot scoring got no labels: there are no images to classify")
    if labels.shape != (len(image_emb),):
        raise EvalError(
            f"zero-shot scoring needs one label per image: {len(image_emb)} image embeddings, "
            f"labels of shape {tuple(labels.shape)}"
        )
    if len(class_emb) != c:
        raise EvalError(f"{len(class_emb)} class embeddings but {c} class names")
    logits = image_emb.float() @ class_emb.float().T  # (N, C)
    if labels.min() < 0 or labels.max() >= c:
        raise EvalError(
            f"labels run {int(labels.min())}..{int(labels.max())} but there are {c} classes"
        )
    top = topk_accuracy(logits, labels, (1, 5))
    pred = predictions(logits, labels)
    per_class = per_class_accuracy(pred, labels, c)
    return {
        "top1": top[1],
        "top5": top[5],
        "num_samples": int(len(labels)),
        "num_classes": c,
        "per_class": dict(zip(classnames, per_class)),
        "confusion": confusion_matrix(pred, labels, c),
    }


def _features_file(
    path: str, field: str, limit: int | None, loaded: Loaded, column: str
) -> dict[str, Any]:
    """The image embeddings (`column`: `embedding_column`) and `field` labels of a features
    file, its first `limit` rows; the file must come from the loaded model's vision tower
    and preprocessing (files written before the check: any), and its embeddings must be as
    wide as the model's text embeddings they are scored against."""
    from mmssl.eval.features_file import check_vision_digest, file_labels, load_features

    if not Path(path).is_file():
        raise EvalError(f"features file not found: {path}")
    try:
        feats = load_features(path)
    except Exception as err:  # safetensors raises its own error types on damage
        raise EvalError(f"{path}: not a readable features file ({err})") from None
    if column not in feats:
        what = "projected 'embeddings'" if column == "embeddings" else "pooled 'features'"
        raise EvalError(f"{path} has no {what}, which this model's image embeddings are")
    if len(feats[column]) == 0:
        # as shards without a readable sample are: topk_accuracy would raise a bare ValueError
        raise EvalError(f"{path} has no feature rows: there are no images to classify")
    labels = file_labels(path, feats, field, column, limit)
    check_vision_digest(path, feats["metadata"], loaded)
    emb, width = feats[column], text_width(loaded.model)
    if emb.ndim != 2 or emb.shape[1] != width:
        # a file without a digest (hand-written) may come from any model: the product with
        # the class embeddings raised a bare RuntimeError
        got = (
            f"{emb.shape[1]}-wide embeddings" if emb.ndim == 2 else f"embeddings {tuple(emb.shape)}"
        )
        raise EvalError(
            f"{path} holds {got}, but --model's class embeddings are {width} wide: they come "
            "from another model; extract the features with this one"
        )
    return {column: emb[:limit], field: labels}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `zeroshot` task's options."""
    parser.add_argument(
        "--data",
        required=True,
        help="labelled image shards (pattern) or a features .safetensors of them",
    )
    parser.add_argument(
        "--classes", required=True, help=f"class JSON file or built-in ({', '.join(BUILTIN)})"
    )
    parser.add_argument(
        "--templates",
        default=None,
        help="templates with {}: a JSON list, inline or in a file (overrides the class file's)",
    )
    parser.add_argument("--label-field", default=None, help="json field holding the class index")


def run(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    """The `zeroshot` task: writes results.json, summary.md, confusion.png under args.out."""
    from mmssl.eval.data import shard_urls
    from mmssl.eval.features import embedding_column, extract_features
    from mmssl.eval.features_file import integer_labels
    from mmssl.eval.fewshot import check_finite
    from mmssl.eval.report import md_table, plot_confusion

    spec = load_classes(args.classes, args.templates)
    field = args.label_field or spec.field
    loaded = ctx.load()
    model = loaded.model
    if model.text is None or model.visual is None:
        raise EvalError("zero-shot classification needs a model with vision and text towers")
    tokenizer = loaded.tokenizer(args.tokenizer)
    column = embedding_column(model)
    if names_features_file(args.data):
        feats = _features_file(args.data, field, args.limit, loaded, column)
    else:
        feats = extract_features(
            model,
            shard_urls(args.data),
            loaded.preprocess,
            batch_size=args.batch_size,
            fields=(field,),
            limit=args.limit,
        )
        feats[field] = integer_labels(feats[field], f"shards {args.data}", field, feats["__key__"])
    check_finite(feats[column], "image")  # NaN scored 0.0, below chance, as a result
    image_emb = F.normalize(feats[column], dim=-1)
    class_emb = class_embeddings(model, tokenizer, spec.prompts, args.batch_size)
    check_finite(class_emb, "class embedding")
    res = score(image_emb, class_emb, feats[field], spec.classnames)
    plot = plot_confusion(
        res["confusion"],
        spec.classnames,
        Path(args.out) / "confusion.png",
        f"zero-shot {field}: top-1 {res['top1']:.3f}",
    )
    rows = [[c, a] for c, a in res["per_class"].items()]
    summary = (
        f"Zero-shot `{field}` over {res['num_classes']} classes, {res['num_samples']} images: "
        f"**top-1 {res['top1']:.4f}**, top-5 {res['top5']:.4f}.\n\n"
        + md_table(["class", "accuracy"], rows)
    )
    ctx.report(
        "zeroshot",
        res,
        data={"shards": args.data, "classes": args.classes, "field": field},
        summary=summary,
        plots=[plot],
    )
    return res
