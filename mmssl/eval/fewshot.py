"""Few-shot probes on frozen features: k labelled images per class, several random draws.

For each k in {1, 2, 4, 8, 16} and each seed, k support samples per class are drawn from the
train split; logistic regression (scikit-learn, L-BFGS), nearest prototype and weighted kNN
are fit on them and scored on the whole test split.  Reports mean and std over seeds and a
curve PNG of accuracy against k.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmssl.eval import classifiers
from mmssl.eval.loading import EvalError

SHOTS = (1, 2, 4, 8, 16)
METHODS = ("logistic", "prototype", "knn")


def check_finite(x: Tensor, split: str) -> None:
    """EvalError unless every feature (N, D) of `split` is finite.  A diverged model's NaN
    features cannot fit a probe (scikit-learn raised a traceback) and must not score one
    (prototype and kNN predicted the first class for every NaN row, a free 1/C)."""
    bad = ~torch.isfinite(torch.as_tensor(x)).all(1)
    if bad.any():
        raise EvalError(
            f"{int(bad.sum())} of {len(bad)} {split} feature rows are not finite (NaN or inf; "
            f"first: row {int(bad.nonzero()[0])}): the model's features diverged, and nothing "
            "can be fit or scored on them"
        )


def check_shots(y: Tensor, shots: Sequence[int]) -> None:
    """EvalError unless every class of the train labels y has at least max(shots) images: a
    class with fewer gave all it had to every draw, and a "k-shot" result with no spread."""
    classes, counts = torch.unique(torch.as_tensor(y).long(), return_counts=True)
    k = max(shots, default=0)
    short = [(int(c), int(n)) for c, n in zip(classes, counts) if n < k]
    if short:
        listed = ", ".join(f"class {c} has {n}" for c, n in short[:5])
        more = f" and {len(short) - 5} more classes have fewer" if len(short) > 5 else ""
        raise EvalError(
            f"{k}-shot needs {k} train images of every class, but {listed}{more}: the largest "
            f"k every class allows is {int(counts.min())}"
        )


def sample_support(y: Tensor, k: int, seed: int) -> Tensor:
    """Indices of k samples of every class of y, seeded (a class with fewer gives all it has:
    `evaluate` refuses such a k first, with `check_shots`)."""
    y = torch.as_tensor(y).long()
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(picks).sort().values


def method_fn(
    name: str, weight_decay: float, knn_k: int, temperature: float
) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The classifier of few-shot method `name`: fn(support x (K, D), y (K,), queries (Q, D))
    -> (classes (C,), scores (Q, C)); EvalError for an unknown name."""
    if name == "logistic":
        return lambda x, y, q: classifiers.logistic_scores(x, y, q, weight_decay)
    if name == "prototype":
        return classifiers.prototype_scores
    if name == "knn":
        return lambda x, y, q: classifiers.knn_scores(x, y, q, knn_k, temperature)
    raise EvalError(f"unknown few-shot method {name!r}; choose from {', '.join(METHODS)}")


def evaluate(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    shots: Sequence[int] = SHOTS,
    seeds: Sequence[int] = (0, 1, 2),
    methods: Sequence[str] = METHODS,
    weight_decay: float = 1e-3,
    knn_k: int = 20,
    temperature: float = 0.07,
) -> dict[str, dict[int, dict[str, Any]]]:
    """{method: {k: {"mean", "std", "runs"}}} top-1 accuracy on the test split, ties
    against the model (`classifiers.predict`)."""
    if len(train_y) == 0 or len(test_y) == 0:
        raise EvalError("few-shot needs non-empty train and test splits")
    if any(k < 1 for k in shots):
        raise EvalError(f"shots must be >= 1, got {list(shots)}")
    if len(set(shots)) != len(shots):
        raise EvalError(f"shots repeat a value, got {list(shots)}")
    if repeats(methods):
        # a method's results are keyed by name: the repeat would be one row printed twice
        raise EvalError(f"methods repeat {', '.join(repeats(methods))}, got {list(methods)}")
    check_finite(train_x, "train")
    check_finite(test_x, "test")
    fns = {m: method_fn(m, weight_decay, knn_k, temperature) for m in methods}
    check_shots(train_y, shots)
    classifiers.check_classes(train_y, test_y, "few-shot classification")
    test_y = torch.as_tensor(test_y).long()
    out: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in methods}
    for k in shots:
        runs: dict[str, list[float]] = {m: [] for m in methods}
        for seed in seeds:
            idx = sample_support(train_y, k, seed)
            x, y = train_x[idx], torch.as_tensor(train_y).long()[idx]
            for m, fn in fns.items():
                # ties count against the model, as in zero-shot: a collapsed encoder's equal
                # scores gave the smallest label id, a score set by how classes are named
                pred = classifiers.predict(*fn(x, y, test_x), test_y)
                runs[m].append(float((pred == test_y).double().mean()))
        for m in methods:
            r = runs[m]
            out[m][k] = {"mean": statistics.fmean(r), "std": statistics.pstdev(r), "runs": r}
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `fewshot` task's options."""
    parser.add_argument(
        "--train", required=True, help="labelled train shards or a features .safetensors"
    )
    parser.add_argument(
        "--test", required=True, help="labelled test shards or a features .safetensors"
    )
    parser.add_argument("--label-field", default="label")
    parser.add_argument("--shots", default=",".join(map(str, SHOTS)))
    parser.add_argument("--seeds", type=int, default=5, help="number of random support draws")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--weight-decay", type=float, default=1e-3, help="logistic regression L2")
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature")


def repeats(values: Sequence[Any]) -> list[str]:
    """The values that occur more than once, in order of first occurrence, as text."""
    return [str(v) for i, v in enumerate(values) if v in values[i + 1 :] and v not in values[:i]]


def parse_list(text: str, name: str, kind: Callable[[str], Any], what: str) -> list[Any]:
    """Comma-separated values of option `name`, each converted by `kind`; EvalError if there
    are none (the task ran nothing and reported empty results), if one does not convert
    (`what`: "integers", ...) or one repeats: results are keyed by value, so a repeat
    overwrote the first (or was dropped) and its summary row or column appeared twice."""
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"{name} must be comma-separated {what}, got {text!r}") from None
    if not values:
        raise EvalError(f"{name} is empty (got {text!r}): give one or more comma-separated {what}")
    if repeats(values):
        raise EvalError(f"{name} repeats {', '.join(repeats(values))} (in {text!r})")
    return values


def parse_ints(text: str, name: str) -> list[int]:
    """Comma-separated integers, none repeated (`parse_list`)."""
    return parse_list(text, name, int, "integers")


def split_features(
    source: str, field: str, ctx: Any, batch_size: int, limit: int | None
) -> tuple[Tensor, Tensor]:
    """(features (N, D), labels (N,)) of shards (extracted with the model) or a features file
    (extracted with the same model, when the file records which)."""
    from mmssl.eval.features_file import names_features_file

    if names_features_file(source):
        from mmssl.eval.features_file import check_vision_digest, file_labels, load_features

        if not Path(source).is_file():
            raise EvalError(f"features file not found: {source}")
        try:
            feats = load_features(source)
        except Exception as err:  # safetensors raises its own error types on damage
            raise EvalError(f"{source}: not a readable features file ({err})") from None
        held = sorted(k for k in feats if k not in ("__key__", "metadata"))
        if "features" not in feats or feats["features"].ndim != 2:
            raise EvalError(f"{source} has no (N, D) 'features' tensor (it holds {held})")
        y = file_labels(source, feats, field, "features", limit)
        if "vision_sha256" in feats["metadata"]:
            # a probe fit on one model's features and scored on another's is meaningless
            check_vision_digest(source, feats["metadata"], ctx.load())
        return feats["features"][:limit], y
    from mmssl.eval.data import shard_urls
    from mmssl.eval.features import extract_features
    from mmssl.eval.features_file import integer_labels

    loaded = ctx.load()
    feats = extract_features(
        loaded.model,
        shard_urls(source),
        loaded.preprocess,
        batch_size=batch_size,
        fields=(field,),
        limit=limit,
    )
    return feats["features"], integer_labels(
        feats[field], f"shards {source}", field, feats["__key__"]
    )


def _same_data(a: str, b: str) -> bool:
    """Whether two sources (a features file, shard paths or URLs) name the same data."""
    if "://" in a or "://" in b or "{" in a or "{" in b:
        return a == b
    return Path(a).resolve() == Path(b).resolve()


def train_test_features(args: argparse.Namespace, ctx: Any) -> tuple[Tensor, ...]:
    """(train_x, train_y, test_x, test_y) of --train and --test, with matching widths."""
    if _same_data(args.train, args.test):
        warnings.warn(
            f"--train and --test are the same data ({args.test}): the test accuracy is an "
            "accuracy on the training samples",
            RuntimeWarning,
            stacklevel=2,
        )
    f = args.label_field, ctx, args.batch_size, args.limit
    train_x, train_y = split_features(args.train, *f)
    test_x, test_y = split_features(args.test, *f)
    if train_x.shape[1] != test_x.shape[1]:
        raise EvalError(
            f"train features have {train_x.shape[1]} dims but test features {test_x.shape[1]}"
        )
    return train_x, train_y, test_x, test_y


def run(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    """The `fewshot` task: writes results.json, summary.md, fewshot.png under args.out."""
    from mmssl.eval.report import md_table, plot_fewshot

    shots = parse_ints(args.shots, "--shots")
    methods = parse_list(args.methods, "--methods", str, "method names")
    for m in methods:
        method_fn(m, 0, 1, 1)
    if args.seeds < 1:
        raise EvalError(f"--seeds must be >= 1, got {args.seeds}")
    if "knn" in methods and args.temperature <= 0:
        raise EvalError(f"--temperature must be > 0 for knn, got {args.temperature}")
    if "logistic" in methods and args.weight_decay <= 0:
        raise EvalError(f"--weight-decay must be > 0 for logistic, got {args.weight_decay}")
    train_x, train_y, test_x, test_y = train_test_features(args, ctx)
    res = evaluate(
        train_x,
        train_y,
        test_x,
        test_y,
        shots=shots,
        seeds=range(args.seeds),
        methods=methods,
        weight_decay=args.weight_decay,
        knn_k=args.knn_k,
        temperature=args.temperature,
    )
    curves = {m: {k: (v["mean"], v["std"]) for k, v in r.items()} for m, r in res.items()}
    plot = plot_fewshot(curves, Path(args.out) / "fewshot.png", f"few-shot {args.label_field}")
    rows = [
        [m, *(f"{res[m][k]['mean']:.4f} ± {res[m][k]['std']:.4f}" for k in shots)] for m in methods
    ]
    summary = (
        f"Top-1 on {len(test_y)} test images, {len(torch.unique(train_y))} classes in the "
        f"support, mean ± std over {args.seeds} support draws "
        f"(seeds 0..{args.seeds - 1}).\n\n"
        + md_table(["method", *(f"{k}-shot" for k in shots)], rows)
    )
    data = {
        "train": args.train,
        "test": args.test,
        "field": args.label_field,
        "support_seeds": list(range(args.seeds)),  # `sample_support`'s, one draw each
    }
    ctx.report("fewshot", res, data=data, summary=summary, plots=[plot])
    return res
