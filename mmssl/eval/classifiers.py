"""Classifiers on frozen features: logistic regression, nearest prototype, weighted kNN.

Every function takes support features (N, D), labels (N,) and query features (M, D) and
returns predicted labels (M,).  Features are L2-normalised inside, so the three methods see
the same geometry (cosine).

Logistic regression is scikit-learn's multinomial `LogisticRegression` (L-BFGS) with an
L2 penalty written as a weight decay: loss = mean cross-entropy + weight_decay / 2 * |W|^2,
i.e. C = 1 / (weight_decay * N).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _norm(x: Tensor) -> Tensor:
    return F.normalize(torch.as_tensor(x).double(), dim=-1)


def fit_logistic(x: Tensor, y: Tensor, weight_decay: float, max_iter: int = 1000) -> object:
    """A fitted multinomial logistic regression on normalised x (N, D)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    xs = _norm(x).numpy()
    ys = torch.as_tensor(y).long().numpy()
    clf = LogisticRegression(C=1.0 / (weight_decay * len(ys)), max_iter=max_iter)
    with warnings.catch_warnings():
        # a weak decay on separable few-shot data never converges exactly; the fit is still usable
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(xs, ys)
    return clf


def predict_logistic(clf: object, x: Tensor) -> Tensor:
    """Labels (M,) predicted by a fitted `fit_logistic` model."""
    return torch.from_numpy(np.asarray(clf.predict(_norm(x).numpy()))).long()  # type: ignore[attr-defined]


def logistic(x: Tensor, y: Tensor, query: Tensor, weight_decay: float = 1e-3) -> Tensor:
    """Fit on (x, y), predict query; a single-class support predicts that class everywhere."""
    y = torch.as_tensor(y).long()
    if len(torch.unique(y)) == 1:
        return torch.full((len(query),), int(y[0]), dtype=torch.long)
    return predict_logistic(fit_logistic(x, y, weight_decay), query)


def prototype(x: Tensor, y: Tensor, query: Tensor) -> Tensor:
    """Nearest class mean by cosine: the prototype of a class is its normalised mean feature."""
    xs, q = _norm(x), _norm(query)
    y = torch.as_tensor(y).long()
    classes = torch.unique(y)  # sorted
    protos = torch.stack([xs[y == c].mean(0) for c in classes])  # (C, D)
    sim = q @ F.normalize(protos, dim=-1).T  # (M, C)
    return classes[sim.argmax(1)]


def knn(x: Tensor, y: Tensor, query: Tensor, k: int = 20, temperature: float = 0.07) -> Tensor:
    """Weighted kNN (as in DINO's evaluation): each of the k most cosine-similar support
    samples votes for its class with weight exp(similarity / temperature)."""
    xs, q = _norm(x), _norm(query)
    y = torch.as_tensor(y).long()
    k = min(k, len(y))
    sim = q @ xs.T  # (M, N)
    top, idx = sim.topk(k, dim=1)  # (M, k), each row sorted: column 0 is its largest
    # exp((s - s_max) / T): the same weights up to one factor per row, so the same votes,
    # and never inf -- exp(s / T) is inf for every neighbour once T < ~0.0014 (s up to 1)
    weights = ((top - top[:, :1]) / temperature).exp()
    # votes go to the classes present, not to columns 0..max label: a label may be negative
    # or large (a synset offset), which made a (M, max + 1) table
    classes, column = torch.unique(y, return_inverse=True)  # sorted, as prototype's
    votes = torch.zeros(len(q), len(classes), dtype=torch.float64)
    votes.scatter_add_(1, column[idx], weights)
    return classes[votes.argmax(1)]
