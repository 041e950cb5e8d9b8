"""Linear probe: logistic regression on frozen features, weight decay chosen on a validation
split held out of train, then refit on all of train and scored once on test."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mmssl.eval import classifiers
from mmssl.eval.fewshot import check_finite, repeats
from mmssl.eval.loading import EvalError

DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def stratified_split(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train indices, validation indices): round(fraction * n_c) of every class to validation,
    at least one while the class keeps one for training."""
    y = torch.as_tensor(y).long()
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def accuracy(clf: object, x: Tensor, y: Tensor) -> float:
    """Top-1 of the fitted logistic regression `clf` on features x (N, D) with labels y (N,),
    ties against the model (`classifiers.predict`), as in few-shot and zero-shot."""
    y = torch.as_tensor(y).long()
    pred = classifiers.predict(*classifiers.logistic_decision(clf, x), y)
    return float((pred == y).double().mean())


def sweep(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    decays: Sequence[float] = DECAYS,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Pick the weight decay with the best validation accuracy (ties: the stronger decay), refit
    on all of train, score on test."""
    if not decays or any(not math.isfinite(d) or d <= 0 for d in decays):
        raise EvalError(f"weight decays must be positive, got {list(decays)}")
    if repeats(decays):
        # val_top1 is keyed by decay: a repeat was fit twice and reported once
        raise EvalError(f"weight decays repeat {', '.join(repeats(decays))}, got {list(decays)}")
    if not 0 < val_fraction < 1:
        raise EvalError(f"validation fraction must be in (0, 1), got {val_fraction}")
    check_finite(train_x, "train")
    check_finite(test_x, "test")
    train_y = torch.as_tensor(train_y).long()
    classifiers.check_classes(train_y, test_y, "a linear probe")
    tr, va = stratified_split(train_y, val_fraction, seed)
    if len(va) == 0:  # every class keeps its one sample for training
        raise EvalError(
            f"the train split has one sample per class ({len(train_y)} samples): no validation "
            "split can be held out to choose the weight decay; use more train samples"
        )
    val_acc = {}
    for d in decays:
        clf = classifiers.fit_logistic(train_x[tr], train_y[tr], d)
        val_acc[d] = accuracy(clf, train_x[va], train_y[va])
    best = max(sorted(decays, reverse=True), key=lambda d: val_acc[d])
    clf = classifiers.fit_logistic(train_x, train_y, best)
    return {
        "top1": accuracy(clf, test_x, test_y),
        "train_top1": accuracy(clf, train_x, train_y),
        "weight_decay": best,
        "val_top1": {str(d): a for d, a in val_acc.items()},
        "num_train": len(train_y),
        "num_test": len(test_y),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `linear` task's options."""
    parser.add_argument(
        "--train", required=True, help="labelled train shards or a features .safetensors"
    )
    parser.add_argument(
        "--test", required=True, help="labelled test shards or a features .safetensors"
    )
    parser.add_argument("--label-field", default="label")
    parser.add_argument("--decays", default=",".join(str(d) for d in DECAYS))
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    """The `linear` task: writes results.json, summary.md under args.out."""
    from mmssl.eval.fewshot import parse_list, train_test_features
    from mmssl.eval.report import md_table

    decays = parse_list(args.decays, "--decays", float, "numbers")
    train_x, train_y, test_x, test_y = train_test_features(args, ctx)
    res = sweep(
        train_x,
        train_y,
        test_x,
        test_y,
        decays=decays,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    summary = (
        f"Linear probe on `{args.label_field}`: **test top-1 {res['top1']:.4f}** with weight decay "
        f"{res['weight_decay']:g} (chosen on {args.val_fraction:.0%} of train).\n\n"
        + md_table(["weight decay", "val top-1"], [[d, a] for d, a in res["val_top1"].items()])
    )
    data = {"train": args.train, "test": args.test, "field": args.label_field}
    ctx.report("linear", res, data=data, summary=summary)
    return res
