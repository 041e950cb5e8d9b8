"""Classifiers on frozen features: logistic regression, nearest prototype, weighted kNN.

Every `*_scores` function takes support features (N, D), labels (N,) and query features
(M, D) and returns the support's classes (C,) (sorted) with a score per query and class
(M, C); `predict` turns scores into labels (M,), with ties against the model when the
query's true labels are given (`metrics.predictions`: a collapsed encoder whose classes all
score equal is wrong everywhere, whatever its labels are called), and `logistic`,
`prototype` and `knn` are the label-free predictions.  Features are L2-normalised inside,
so the three methods see the same geometry (cosine).

Logistic regression is scikit-learn's multinomial `LogisticRegression` (L-BFGS) with an
L2 penalty written as a weight decay: loss = mean cross-entropy + weight_decay / 2 * |W|^2,
i.e. C = 1 / (weight_decay * N).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mmssl.eval.loading import EvalError
from mmssl.eval.metrics import predictions


def _norm(x: Tensor) -> Tensor:
    return F.normalize(torch.as_tensor(x).double(), dim=-1)


def fit_logistic(x: Tensor, y: Tensor, weight_decay: float, max_iter: int = 5000) -> object:
    """A fitted multinomial logistic regression on normalised x (N, D).

    L-BFGS stops when the loss's largest gradient entry is below `tol`, and the weights can
    then be as far as tol / weight_decay from the optimum along the flattest direction: with
    scikit-learn's default 1e-4, a 1e-6 decay's fit moved with the last bit of its input
    (two normalisations 6e-17 apart scored 0.660 and 0.677 on one test set; 0.684 both,
    converged).  So tol scales with the decay (at most 1e-4, so a decay of 1e-3 and above
    fits as scikit-learn's default would): 22 s instead of 6 s for the 1e-6 fit of 1,439
    samples x 96 features, predictions as the converged fit's.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    xs = _norm(x).numpy()
    ys = torch.as_tensor(y).long().numpy()
    tol = min(1e-4, 0.1 * weight_decay)
    clf = LogisticRegression(C=1.0 / (weight_decay * len(ys)), tol=tol, max_iter=max_iter)
    with warnings.catch_warnings():
        # a weak decay on separable few-shot data never converges exactly; the fit is still usable
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(xs, ys)
    return clf


def logistic_decision(clf: object, x: Tensor) -> tuple[Tensor, Tensor]:
    """(classes (C,), scores (M, C)) of a fitted `fit_logistic` model on x (M, D): its
    decision function, a binary model's one column d as scores (0, d) (scikit-learn predicts
    the second class where d > 0)."""
    fitted: Any = clf
    d = torch.from_numpy(np.asarray(fitted.decision_function(_norm(x).numpy()))).double()
    if d.ndim == 1:
        d = torch.stack([torch.zeros_like(d), d], dim=1)  # (M, 2)
    return torch.from_numpy(np.asarray(fitted.classes_)).long(), d


def predict(classes: Tensor, scores: Tensor, labels: Tensor | None = None) -> Tensor:
    """classes (C,) sorted, scores (M, C) -> predicted labels (M,): the best-scoring class;
    given the true labels (M,), a label tied at the top is not predicted (ties count against
    the model, `metrics.predictions`), and a label that is none of `classes` is never hit."""
    if labels is None:
        return classes[scores.argmax(1)]
    labels = torch.as_tensor(labels).long()
    column = torch.searchsorted(classes, labels).clamp(max=len(classes) - 1)
    known = classes[column] == labels
    tied_against = classes[predictions(scores, torch.where(known, column, 0))]
    return torch.where(known, tied_against, classes[scores.argmax(1)])


def logistic_scores(
    x: Tensor, y: Tensor, query: Tensor, weight_decay: float = 1e-3
) -> tuple[Tensor, Tensor]:
    """(classes (C,), scores (M, C)) of logistic regression fit on (x, y); a single-class
    support scores its class alone (there is nothing to fit)."""
    y = torch.as_tensor(y).long()
    if len(torch.unique(y)) == 1:
        return y[:1].clone(), torch.zeros(len(query), 1, dtype=torch.float64)
    return logistic_decision(fit_logistic(x, y, weight_decay), query)


def prototype_scores(x: Tensor, y: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
    """(classes (C,), cosine (M, C) of each query to each class prototype: the normalised
    mean feature of the class)."""
    xs, q = _norm(x), _norm(query)
    y = torch.as_tensor(y).long()
    classes = torch.unique(y)  # sorted
    protos = torch.stack([xs[y == c].mean(0) for c in classes])  # (C, D)
    return classes, q @ F.normalize(protos, dim=-1).T  # (M, C)


def knn_scores(
    x: Tensor,
    y: Tensor,
    query: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    block_elements: int = 1 << 22,
) -> tuple[Tensor, Tensor]:
    """(classes (C,), votes (M, C)) of weighted kNN (as in DINO's evaluation): each of the k
    most cosine-similar support samples votes for its class with weight
    exp(similarity / temperature).  Support samples tied with the k-th nearest share its
    remaining places equally: picking some of them (topk's choice, or the first rows) made
    the votes of a collapsed encoder follow the order of the support set.

    The queries go in blocks of about `block_elements` similarities (DINO's knn_classifier
    chunks them too): the whole (M, N) float64 similarity and its four temporaries of that
    size took ~29 GB at ImageNet's 50k test images against a 16-shot support of 16k."""
    xs, q = _norm(x), _norm(query)
    y = torch.as_tensor(y).long()
    k = min(k, len(y))
    # votes go to the classes present, not to columns 0..max label: a label may be negative
    # or large (a synset offset), which made a (M, max + 1) table
    classes, column = torch.unique(y, return_inverse=True)  # sorted, as prototype's
    votes = torch.zeros(len(q), len(classes), dtype=torch.float64)
    rows = max(1, block_elements // max(1, len(xs)))
    for a in range(0, len(q), rows):
        votes[a : a + rows] = _knn_votes(q[a : a + rows], xs, column, len(classes), k, temperature)
    return classes, votes


def _knn_votes(
    q: Tensor, xs: Tensor, column: Tensor, num_classes: int, k: int, temperature: float
) -> Tensor:
    """`knn_scores`' votes (B, C) of normalised queries q (B, D) by the normalised support xs
    (N, D), whose class columns are `column` (N,)."""
    sim = q @ xs.T  # (B, N)
    kth = sim.topk(k, dim=1).values[:, -1:]  # (B, 1)
    above, at = sim > kth, sim == kth
    share = (k - above.sum(1, keepdim=True)) / at.sum(1, keepdim=True)  # places per tied row
    # exp((s - s_max) / T): the same weights up to one factor per row, so the same votes,
    # and never inf -- exp(s / T) is inf for every neighbour once T < ~0.0014 (s up to 1)
    top = sim.max(1, keepdim=True).values
    weights = ((sim - top) / temperature).exp() * (above + at * share)  # (B, N)
    votes = torch.zeros(len(q), num_classes, dtype=torch.float64)
    return votes.index_add_(1, column, weights)


def check_classes(train_y: Tensor, test_y: Tensor, task: str) -> None:
    """EvalError for a train split of one class (every method is right on a 1-way task:
    class-sorted shards cut by --limit scored 1.0 untrained); a RuntimeWarning naming the
    test classes that have no train sample, whose test samples no method can get right (a
    wrong --label-field, splits labelled differently: an accuracy with a hidden ceiling)."""
    train = torch.unique(torch.as_tensor(train_y).long())
    if len(train) < 2:
        raise EvalError(
            f"{task} needs at least two classes in the train split, got {train.tolist()} "
            "(shards written class by class and cut by --limit hold one)"
        )
    test = torch.as_tensor(test_y).long()
    unseen = test[~torch.isin(test, train)]
    if len(unseen):
        names = torch.unique(unseen).tolist()
        shown = ", ".join(map(str, names[:10])) + (", ..." if len(names) > 10 else "")
        warnings.warn(
            f"{len(names)} test classes have no train sample ({shown}): their {len(unseen)} of "
            f"{len(test)} test samples ({len(unseen) / len(test):.1%}) cannot be predicted right",
            RuntimeWarning,
            stacklevel=3,
        )


def logistic(x: Tensor, y: Tensor, query: Tensor, weight_decay: float = 1e-3) -> Tensor:
    """Labels (M,) predicted by `logistic_scores` (a single-class support: that class)."""
    return predict(*logistic_scores(x, y, query, weight_decay))


def prototype(x: Tensor, y: Tensor, query: Tensor) -> Tensor:
    """Labels (M,) of the nearest class prototype by cosine (`prototype_scores`)."""
    return predict(*prototype_scores(x, y, query))


def knn(x: Tensor, y: Tensor, query: Tensor, k: int = 20, temperature: float = 0.07) -> Tensor:
    """Labels (M,) with the most kNN votes (`knn_scores`)."""
    return predict(*knn_scores(x, y, query, k, temperature))
