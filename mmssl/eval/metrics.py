"""Evaluation metrics as pure functions of tensors: no model, no I/O.

Ties count against the model everywhere (a class or item that scores *equal* to the right
answer outranks it), so a collapsed model whose scores are all equal gets chance-or-worse
accuracy instead of a lucky index-0 answer.  A NaN score counts against the model too, so a
diverged run scores 0 rather than 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _ahead(scores: Tensor, target: Tensor) -> Tensor:
    """scores (N, C), target (N,) -> (N, C) bool: the other columns that score >= the
    target's.  A NaN counts against the model: a NaN column is ahead of the target, and a
    NaN target has every other column ahead of it."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    target = torch.as_tensor(target, dtype=torch.int64)
    own = scores.gather(1, target[:, None])  # (N, 1)
    ahead = (scores >= own) | scores.isnan() | own.isnan()
    return ahead.scatter(1, target[:, None], False)


def predictions(scores: Tensor, labels: Tensor) -> Tensor:
    """scores (N, C), labels (N,) -> (N,) predicted columns, ties against the model.

    The argmax, except that a label tied at the top is not predicted: the best of the
    columns ahead of it is (NaN first).  So `pred == label` exactly where top-1 counts a hit,
    and per-class accuracy and the confusion matrix agree with `topk_accuracy`.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    ahead = _ahead(scores, labels)
    rival = scores.masked_fill(~ahead, -math.inf).nan_to_num(nan=math.inf).argmax(1)
    return torch.where(ahead.any(1), rival, labels)


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """logits (N, C), labels (N,) -> {k: fraction whose label is among the top k}.

    k larger than C is clipped to C (top-5 of a 3-class problem is 1.0).
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"need logits (N, C) and labels (N,), got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    if len(labels) == 0:
        raise ValueError("no samples to score")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(
            f"labels must be in [0, {logits.shape[1]}), got {labels.min()}..{labels.max()}"
        )
    rank = _ahead(logits, labels).sum(1)  # other columns scoring >= the label's
    return {k: float((rank < min(k, logits.shape[1])).double().mean()) for k in ks}


def confusion_matrix(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C, C) int64 counts; row = true class, column = predicted class.  ValueError for a
    prediction or label outside [0, C) (it would be counted in another cell)."""
    pred = torch.as_tensor(pred, dtype=torch.int64)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if pred.shape != labels.shape or pred.ndim != 1:
        raise ValueError(
            f"need pred (N,) and labels (N,), got {tuple(pred.shape)}, {tuple(labels.shape)}"
        )
    for name, t in (("predictions", pred), ("labels", labels)):
        if len(t) and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(
                f"{name} must be in [0, {num_classes}), got {int(t.min())}..{int(t.max())}"
            )
    flat = labels * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def per_class_accuracy(pred: Tensor, labels: Tensor, num_classes: int) -> list[float]:
    """Recall of each class; NaN for a class with no samples."""
    cm = confusion_matrix(pred, labels, num_classes).double()
    support = cm.sum(1)
    return [
        float(cm[c, c] / support[c]) if support[c] > 0 else math.nan for c in range(num_classes)
    ]


def mean_per_class_accuracy(pred: Tensor, labels: Tensor, num_classes: int) -> float:
    """Balanced accuracy: the mean of per-class accuracy over classes that have samples."""
    acc = [a for a in per_class_accuracy(pred, labels, num_classes) if not math.isnan(a)]
    return sum(acc) / len(acc)


def recall_at_k(
    scores: Tensor, positives: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
    """scores (Q, G) similarity of each query to each gallery item, positives (Q, G) bool.

    A query counts as retrieved at k when its best-scoring positive has fewer than k
    non-positives scoring >= it.  Several positives per query (several captions of one
    image, identical captions of several images) are handled by the mask.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64)
    positives = torch.as_tensor(positives, dtype=torch.bool)
    if scores.shape != positives.shape or scores.ndim != 2:
        raise ValueError(
            f"scores and positives must both be (Q, G), got {tuple(scores.shape)}, {tuple(positives.shape)}"
        )
    above = ahead_of_best(scores, positives)
    return {k: float((above < k).double().mean()) for k in ks}


def ahead_of_best(scores: Tensor, positives: Tensor) -> Tensor:
    """(Q,) int64: per query, the non-positives scoring >= its best positive (a NaN score
    counts as ahead); ValueError for a query without a positive.  `recall_at_k`'s count,
    for callers that score blocks of queries (`eval.retrieval.score`)."""
    if not positives.any(1).all():
        raise ValueError("every query needs at least one positive gallery item")
    best = scores.masked_fill(~positives, -math.inf).amax(1, keepdim=True)  # (Q, 1), NaN wins
    return (((scores >= best) | scores.isnan() | best.isnan()) & ~positives).sum(1)


def pair_positives(query_group: Tensor, gallery_group: Tensor) -> Tensor:
    """Positives mask (Q, G): query i matches gallery j when they share a group id.

    For image->text retrieval with several captions per image: query_group = image ids of
    images (arange), gallery_group = the image id of each caption.
    """
    q = torch.as_tensor(query_group, dtype=torch.int64)
    g = torch.as_tensor(gallery_group, dtype=torch.int64)
    return q[:, None] == g[None, :]


def perplexity(total_nll: float, num_tokens: int) -> float:
    """exp(mean negative log-likelihood per token), nats; inf past float range (a diverged
    model's mean NLL above ~709 nats made math.exp raise OverflowError, a CLI traceback)."""
    if num_tokens <= 0:
        raise ValueError("perplexity of zero tokens")
    try:
        return math.exp(total_nll / num_tokens)
    except OverflowError:
        return math.inf


def unigram_perplexity(train_counts: Tensor, eval_tokens: Tensor, alpha: float = 1.0) -> float:
    """Perplexity on eval_tokens (N,) of a unigram model fit to counts (V,), add-alpha smoothed.

    The baseline an LM must beat: it knows token frequencies and nothing about context.
    """
    counts = torch.as_tensor(train_counts, dtype=torch.float64)
    probs = (counts + alpha) / (counts.sum() + alpha * len(counts))
    tokens = torch.as_tensor(eval_tokens, dtype=torch.int64).reshape(-1)
    return perplexity(float(-probs.log()[tokens].sum()), len(tokens))
