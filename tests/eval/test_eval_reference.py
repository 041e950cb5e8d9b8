"""mmssl.eval's numbers against scikit-learn, a naive loop or an analytic case, never
against mmssl's own code (a mutation audit; each test caught a mutant the others let
through): the linear probe's held-out selection, the logistic fit at its objective's
optimum, feature extraction from a model left in train mode, zero-shot logits that
separate classes 2e-4 of a cosine apart; with top-k, the confusion matrix, kNN, recall@k
and few-shot draws checked alike.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmssl.eval import classifiers, fewshot, linear, metrics, retrieval

# ---------------------------------------------------------------- linear probe (survivor M27)


def _sk_val_accuracy(x, y, tr, va, decay):
    """Held-out accuracy of scikit-learn's LR fit on tr with loss = mean CE + decay/2 |W|^2,
    by a naive loop (a tie at the top counts against the model)."""
    from sklearn.linear_model import LogisticRegression

    xn = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float64)
    clf = LogisticRegression(C=1.0 / (decay * len(tr)), max_iter=5000, tol=1e-10)
    clf.fit(xn[tr], y[tr])
    d = clf.decision_function(xn[va])
    if d.ndim == 1:
        d = np.stack([np.zeros_like(d), d], 1)
    hits = 0
    for row, label in zip(d, y[va]):
        col = list(clf.classes_).index(label)
        hits += all(row[j] < row[col] for j in range(len(row)) if j != col)
    return hits / len(va)


def test_linear_val_top1_is_held_out_accuracy_not_training_accuracy() -> None:
    """Random labels on random features: a weakly decayed LR fits its training rows (high
    training accuracy) and is near chance on the held-out rows.  val_top1 must be the latter
    (a probe choosing its decay on the rows it was fit on always picks the weakest decay)."""
    g = np.random.default_rng(0)
    n, dim = 120, 16
    x = g.normal(size=(n, dim))
    y = np.tile(np.arange(3), n // 3)
    g.shuffle(y)
    decays = (1e-6, 1e-1, 10.0)
    res = linear.sweep(
        torch.tensor(x),
        torch.tensor(y),
        torch.tensor(x[:9]),
        torch.tensor(y[:9]),
        decays=decays,
        val_fraction=0.25,
        seed=0,
    )
    tr, va = linear.stratified_split(torch.tensor(y), 0.25, 0)
    tr, va = tr.numpy(), va.numpy()
    # the split itself: disjoint, covering, stratified
    assert set(tr).isdisjoint(va) and len(tr) + len(va) == n
    assert sorted(np.bincount(y[va]).tolist()) == [10, 10, 10]
    for d in decays:
        ref = _sk_val_accuracy(x, y, tr, va, d)
        assert res["val_top1"][str(d)] == pytest.approx(ref, abs=1.5 / len(va)), d
    # and the weak decay really does memorise: its training accuracy is far above val
    assert _sk_val_accuracy(x, y, tr, tr, 1e-6) > res["val_top1"]["1e-06"] + 0.3


# ---------------------------------------------------- feature extraction mode (survivor M32/35)


@pytest.fixture(scope="module")
def drop_path_model(tmp_path_factory):
    from eval_helpers import make_tiny_model_dir, write_labelled_shards

    from mmssl.eval.loading import load_model
    from mmssl.tokenizer import get_tokenizer

    d = make_tiny_model_dir(
        str(tmp_path_factory.mktemp("dp")), get_tokenizer(), vision={"block": {"drop_path": 0.9}}
    )
    shards = write_labelled_shards(str(tmp_path_factory.mktemp("sh")), n=8, split="test")
    return load_model(d), shards


def test_extract_features_is_deterministic_and_eval_mode_for_a_training_model(drop_path_model):
    """extract_features on a model left in train mode (a training-time eval hook, a notebook)
    must give the eval-mode features: a naive loop over the images through encode_image in
    eval mode.  With drop-path 0.9 a train-mode forward drops most residual branches."""
    from mmssl.eval.data import iter_image_batches, shard_urls
    from mmssl.eval.features import extract_features

    loaded, shards = drop_path_model
    model = loaded.model
    urls = shard_urls(shards)
    model.eval()
    with torch.no_grad():
        ref = torch.cat(
            [model.encode_image(b["image"]) for b in iter_image_batches(urls, loaded.preprocess, 3)]
        )
    model.train()
    torch.manual_seed(1)
    got = extract_features(model, urls, loaded.preprocess, batch_size=3)
    assert model.training, "extract_features must restore the caller's train mode"
    torch.testing.assert_close(got["embeddings"], ref, rtol=1e-5, atol=1e-5)
    model.eval()


# ------------------------------------------------------------ metrics against scikit-learn


def test_topk_and_per_class_match_sklearn_without_ties() -> None:
    from sklearn.metrics import (
        balanced_accuracy_score,
        confusion_matrix,
        recall_score,
        top_k_accuracy_score,
    )

    g = torch.Generator().manual_seed(0)
    s = torch.randn(200, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (200,), generator=g)
    top = metrics.topk_accuracy(s, y, (1, 2, 5, 7, 9))
    for k in (1, 2, 5):
        assert top[k] == pytest.approx(top_k_accuracy_score(y, s, k=k, labels=range(7)))
    assert top[7] == top[9] == 1.0
    pred = metrics.predictions(s, y)
    assert torch.equal(pred, s.argmax(1))
    cm = metrics.confusion_matrix(pred, y, 7)
    assert (cm.numpy() == confusion_matrix(y, pred, labels=range(7))).all()
    assert metrics.per_class_accuracy(pred, y, 7) == pytest.approx(
        recall_score(y, pred, average=None, labels=range(7)).tolist()
    )
    assert metrics.mean_per_class_accuracy(pred, y, 7) == pytest.approx(
        balanced_accuracy_score(y, pred)
    )


def test_topk_with_ties_matches_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 3, (300, 6), generator=g).double()  # many ties
    y = torch.randint(0, 6, (300,), generator=g)
    top = metrics.topk_accuracy(s, y, (1, 2, 3, 6))
    for k in (1, 2, 3, 6):
        hits = sum(
            sum(s[i, j] >= s[i, y[i]] for j in range(6) if j != y[i]) < k for i in range(300)
        )
        assert top[k] == pytest.approx(hits / 300)


def test_recall_at_k_and_blocked_retrieval_match_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(9, 4, generator=g), dim=-1)
    txt = F.normalize(torch.randn(20, 4, generator=g), dim=-1)
    image_of_text = torch.randint(0, 9, (20,), generator=g)
    image_of_text[:9] = torch.arange(9)  # every image has a caption
    texts = [f"c{int(t) % 4}" for t in torch.randint(0, 8, (20,), generator=g)]
    group = retrieval.caption_groups(image_of_text, texts)
    pos = torch.zeros(9, 20, dtype=torch.bool)  # naive positives: same text as a caption of i
    for i in range(9):
        own = {texts[j] for j in range(20) if image_of_text[j] == i}
        for j in range(20):
            pos[i, j] = texts[j] in own
    sim = img.double() @ txt.double().T

    def naive(scores, positive, k):
        hit = 0
        for row, p in zip(scores, positive):
            best = max(row[j] for j in range(len(row)) if p[j])
            hit += sum(1 for j in range(len(row)) if not p[j] and row[j] >= best) < k
        return hit / len(scores)

    for block in (1, 7, 1 << 24):
        res = retrieval.score(img, txt, image_of_text, group, block=block)
        for k in (1, 5, 10):
            assert res[f"i2t_R@{k}"] == pytest.approx(naive(sim, pos, k)), (block, k)
            assert res[f"t2i_R@{k}"] == pytest.approx(naive(sim.T, pos.T, k)), (block, k)


# ------------------------------------------------------------ classifiers against references


def test_knn_votes_match_sklearn_kneighbors_with_exp_weights() -> None:
    from sklearn.neighbors import KNeighborsClassifier

    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (60,), generator=g) * 10 + 5  # labels that are not column indices
    q = torch.randn(25, 8, generator=g, dtype=torch.float64)
    for k, t in ((1, 0.07), (7, 0.07), (7, 1.0), (20, 0.3)):
        classes, votes = classifiers.knn_scores(x, y, q, k=k, temperature=t, block_elements=64)
        xn, qn = F.normalize(x, dim=-1).numpy(), F.normalize(q, dim=-1).numpy()
        ref = KNeighborsClassifier(
            n_neighbors=k,
            metric="cosine",
            algorithm="brute",
            weights=lambda d, t=t: np.exp((1 - d) / t),
        ).fit(xn, y.numpy())
        assert classes.tolist() == ref.classes_.tolist()
        np.testing.assert_allclose(
            (votes / votes.sum(1, keepdim=True)).numpy(), ref.predict_proba(qn), rtol=1e-6
        )


def test_prototype_matches_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 5, generator=g) * torch.rand(30, 1, generator=g) * 10
    y = torch.randint(0, 3, (30,), generator=g)
    q = torch.randn(10, 5, generator=g)
    classes, s = classifiers.prototype_scores(x, y, q)
    for c_i, c in enumerate(classes.tolist()):
        members = [x[i] / x[i].norm() for i in range(30) if y[i] == c]
        m = sum(members) / len(members)
        for j in range(10):
            ref = float(q[j].double() @ m.double() / (q[j].double().norm() * m.double().norm()))
            assert s[j, c_i].item() == pytest.approx(ref, abs=1e-6)


def test_fewshot_support_is_k_per_class_from_train_only_and_scores_all_test() -> None:
    """evaluate's accuracy for prototype equals a naive loop over its own support draws; the
    support holds exactly k train rows per class and none of the test rows."""
    g = torch.Generator().manual_seed(5)
    centers = F.normalize(torch.randn(4, 6, generator=g), dim=-1)
    ty = torch.arange(4).repeat(10)
    tx = centers[ty] + 0.6 * torch.randn(40, 6, generator=g)
    qy = torch.arange(4).repeat(6)
    qx = centers[qy] + 0.6 * torch.randn(24, 6, generator=g)
    res = fewshot.evaluate(tx, ty, qx, qy, shots=(1, 3), seeds=(0, 1, 2), methods=("prototype",))
    for k in (1, 3):
        accs = []
        for seed in (0, 1, 2):
            idx = fewshot.sample_support(ty, k, seed)
            assert len(set(idx.tolist())) == 4 * k and idx.max() < 40
            assert torch.bincount(ty[idx]).tolist() == [k] * 4
            protos = [
                F.normalize(F.normalize(tx[idx][ty[idx] == c], dim=-1).mean(0), dim=0)
                for c in range(4)
            ]
            hit = 0
            for v, lab in zip(qx, qy):
                sc = [float(F.normalize(v, dim=0) @ p) for p in protos]
                hit += all(sc[c] < sc[lab] for c in range(4) if c != lab)
            accs.append(hit / 24)
        assert res["prototype"][k]["runs"] == pytest.approx(accs)
        assert res["prototype"][k]["mean"] == pytest.approx(sum(accs) / 3)
        mu = sum(accs) / 3
        assert res["prototype"][k]["std"] == pytest.approx(
            math.sqrt(sum((a - mu) ** 2 for a in accs) / 3)
        )


# ------------------------------------------------------- logistic optimum (survivor M42)


@pytest.mark.parametrize("wd", [1e-2, 1e-3])
def test_logistic_fit_is_at_the_optimum_of_its_stated_objective(wd) -> None:
    """The classifiers docstring: loss = mean CE + wd / 2 * |W|^2 on normalised x (intercept
    unpenalised).  At the fitted weights the gradient of that loss (torch autograd, not
    scikit-learn) must vanish: an under-converged fit reports another probe's accuracy."""
    g = torch.Generator().manual_seed(6)
    n, dim, c = 300, 32, 5
    centers = torch.randn(c, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    x = centers[y] * 0.3 + torch.randn(n, dim, generator=g, dtype=torch.float64)  # overlapping
    clf = classifiers.fit_logistic(x, y, wd)
    w = torch.tensor(clf.coef_, requires_grad=True)
    b = torch.tensor(clf.intercept_, requires_grad=True)
    xn = F.normalize(x, dim=-1)
    loss = F.cross_entropy(xn @ w.T + b, y) + wd / 2 * (w**2).sum()
    loss.backward()
    grad = torch.cat([w.grad.flatten(), b.grad])
    assert grad.abs().max() < 1e-4, float(grad.abs().max())


# ------------------------------------------------ zero-shot near ties (survivor M47)


def test_zeroshot_resolves_classes_2e4_of_a_cosine_apart() -> None:
    """Analytic case: the image has cosine 0.9995 to its own class embedding and 0.9993 to the
    other (prompt ensembles of related classes are this close).  Top-1 is 1.0; a product
    rounded to half precision (spacing 2^-11 ~ 5e-4 near 1) ties them, and a tie counts
    against the model."""
    from mmssl.eval.zeroshot import score

    a, b = 0.9995, 0.9993
    classes = torch.tensor([[a, math.sqrt(1 - a * a), 0.0], [b, 0.0, math.sqrt(1 - b * b)]])
    images = torch.tensor([[1.0, 0.0, 0.0]])
    assert (images.double() @ classes.double().T)[0].tolist() == pytest.approx([a, b], abs=1e-7)
    res = score(images, classes, torch.tensor([0]), ["a", "b"])
    assert res["top1"] == 1.0


@pytest.mark.parametrize("wd", [1e-6, 1e-5])
def test_weakly_decayed_logistic_predicts_as_the_converged_fit(wd) -> None:
    """Real digits through a random projection (48 features, 1,200 train rows: nearly
    separable, like a linear probe's features).  A weak decay leaves the objective flat, so a
    fit stopped at scikit-learn's default tolerance predicted 9 (1e-6) and 5 (1e-5) of the 597
    test rows unlike the converged fit (tol 1e-10), and changed with the last bit of its
    input; the probe's test accuracy and its choice of decay then rest on rounding.  One row
    may differ: at a decay of 1e-2 one does at any tolerance (a near tie)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = x @ np.random.default_rng(0).standard_normal((64, 48))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    tr, te = slice(0, 1200), slice(1200, None)
    ref = LogisticRegression(C=1 / (wd * 1200), tol=1e-10, max_iter=100_000).fit(xn[tr], y[tr])
    clf = classifiers.fit_logistic(torch.tensor(x[tr]), torch.tensor(y[tr]), wd)
    got = np.asarray(clf.predict(xn[te]))  # type: ignore[attr-defined]
    assert (got != ref.predict(xn[te])).sum() <= 1
