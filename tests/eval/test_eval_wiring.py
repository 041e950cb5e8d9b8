"""Evaluation's wiring around its (separately tested) metric functions, against independent
references: a 2-class logistic probe predicts as scikit-learn's fit does, `fewshot.evaluate`
passes its kNN k and temperature and its weight decay on to the classifiers, its std is the
population std over seeds, a validation split rounds half fractions, the perplexity stream
scores a final two-token row, and the unigram baseline is fit on the scored targets only.
(A third mutation audit found each of these unchecked.)"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmssl.eval import classifiers, fewshot, linear, lm


def _blobs(n_per, classes, dim=8, seed=0, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    x = torch.cat(
        [centers[c] + spread * torch.randn(n_per, dim, generator=g) for c in range(classes)]
    )
    y = torch.arange(classes).repeat_interleave(n_per)
    return x, y


def test_binary_logistic_matches_sklearn_predict():
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(20, 2, seed=1, spread=1.5)
    q, qy = _blobs(15, 2, seed=1, spread=1.5)
    wd = 1e-2
    clf = LogisticRegression(C=1 / (wd * len(y)), max_iter=1000)
    clf.fit(F.normalize(x.double(), dim=-1).numpy(), y.numpy())
    want = torch.from_numpy(clf.predict(F.normalize(q.double(), dim=-1).numpy()))
    got = classifiers.logistic(x, y, q, wd)
    assert torch.equal(got, want)
    # and with labels (ties against the model) the accuracy is sklearn's score
    acc = float(
        (classifiers.predict(*classifiers.logistic_scores(x, y, q, wd), qy) == qy).double().mean()
    )
    assert acc == pytest.approx(clf.score(F.normalize(q.double(), dim=-1).numpy(), qy.numpy()))
    assert acc > 0.5


@pytest.mark.parametrize(
    "method,kw",
    [
        ("knn", dict(knn_k=1, temperature=0.5)),
        ("knn", dict(knn_k=3, temperature=5.0)),
        ("logistic", dict(weight_decay=3.0)),
    ],
)
def test_fewshot_evaluate_threads_its_parameters(method, kw):
    """evaluate's runs equal the classifier called directly on the same support draw."""
    x, y = _blobs(12, 3, seed=2, spread=1.2)
    tx, ty = _blobs(10, 3, seed=3, spread=1.2)
    k, seeds = 4, (0, 1, 2)
    out = fewshot.evaluate(x, y, tx, ty, shots=[k], seeds=seeds, methods=[method], **kw)
    want = []
    for s in seeds:
        idx = fewshot.sample_support(y, k, s)
        if method == "knn":
            sc = classifiers.knn_scores(x[idx], y[idx], tx, kw["knn_k"], kw["temperature"])
        else:
            sc = classifiers.logistic_scores(x[idx], y[idx], tx, kw["weight_decay"])
        want.append(float((classifiers.predict(*sc, ty) == ty).double().mean()))
    assert out[method][k]["runs"] == pytest.approx(want)


def test_fewshot_std_is_population_std_over_seeds():
    x, y = _blobs(12, 3, seed=4, spread=2.0)
    tx, ty = _blobs(10, 3, seed=5, spread=2.0)
    r = fewshot.evaluate(x, y, tx, ty, shots=[1], seeds=(0, 1, 2, 3), methods=["prototype"])[
        "prototype"
    ][1]
    assert r["std"] == pytest.approx(
        float(np.std(r["runs"]))
    )  # ddof=0, as documented in 'std over seeds'


def test_stratified_split_rounds_half_fractions():
    y = torch.arange(2).repeat_interleave(5)  # 5 per class, fraction 0.3 -> round(1.5) = 2
    tr, va = linear.stratified_split(y, 0.3, 0)
    assert len(va) == 2 * round(0.3 * 5) and len(tr) == 10 - len(va)


def test_stream_nll_scores_a_final_two_token_row():
    V = 16

    def zero(ids):
        return torch.zeros(*ids.shape, V)

    tokens = list(range(1, 8))  # 7 tokens, context 4 -> rows of 5 and 2: 4 + 1 targets
    total, count, targets = lm.stream_nll(zero, tokens, 4)
    assert count == 5 and targets.tolist() == [2, 3, 4, 5, 7]
    assert total == pytest.approx(5 * math.log(V))


def test_unigram_baseline_without_train_data_is_fit_on_the_scored_targets(monkeypatch):
    import mmssl.eval.data as data

    class Tok:
        eos_id, vocab_size = 1, 128

        def encode(self, text, add_bos=False, add_eos=False):
            return [ord(c) for c in text]

    monkeypatch.setattr(data, "shard_urls", lambda p: p)
    monkeypatch.setattr(data, "iter_documents", lambda p: iter(["ab"]))
    V = 128
    model = SimpleNamespace(
        lm_logits=lambda x: torch.zeros(*x.shape, V),
        cfg=SimpleNamespace(text=SimpleNamespace(context_length=8, vocab_size=V)),
    )
    res = lm.perplexity_report(model, Tok(), "eval", None, None)
    # targets: b, eos (the first token 'a' is never scored) -> add-one p = 2 / (2 + V) each
    assert res["unigram_perplexity"] == pytest.approx((2 + V) / 2)
