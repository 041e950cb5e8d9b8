"""Few-shot and linear probes: classifiers on constructed features with hand-computed answers."""

from __future__ import annotations

import math

import pytest
import torch

from mmssl.eval import classifiers, fewshot, linear
from mmssl.eval.loading import EvalError


def _angles(degrees: list[float]) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees])


def test_prototype_three_of_four():
    # class 0 around 0 deg, class 1 around 90 deg: prototypes at 0 and 90 deg
    x = _angles([-10, 10, 80, 100])
    y = torch.tensor([0, 0, 1, 1])
    q = _angles([5, 30, 60, 50])  # 50 deg is nearer 90 -> wrong for label 0
    pred = classifiers.prototype(x, y, q)
    assert pred.tolist() == [0, 0, 1, 1]
    truth = torch.tensor([0, 0, 1, 0])
    assert (pred == truth).double().mean().item() == 0.75


def test_knn_temperature_weighted_votes():
    # one class-0 neighbour at 0 deg and two class-1 neighbours at 40 and 44 deg; query at 10 deg
    x = _angles([0, 40, 44])
    y = torch.tensor([0, 1, 1])
    q = _angles([10])
    sims = torch.cos(torch.deg2rad(torch.tensor([10.0, 30.0, 34.0])))
    for t in (0.01, 1.0):
        w = torch.exp(sims / t)
        want = 0 if w[0] > w[1] + w[2] else 1
        assert classifiers.knn(x, y, q, k=3, temperature=t).tolist() == [want]
    # by hand: at t=0.01 the single closest neighbour dominates; at t=1 two votes beat one
    assert classifiers.knn(x, y, q, k=3, temperature=0.01).item() == 0
    assert classifiers.knn(x, y, q, k=3, temperature=1.0).item() == 1
    assert classifiers.knn(x, y, q, k=1, temperature=1.0).item() == 0


def test_logistic_separable():
    x = _angles([0, 10, 20, 120, 130, 140, 240, 250, 260])
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    q = _angles([15, 125, 255, 5])
    assert classifiers.logistic(x, y, q, weight_decay=1e-4).tolist() == [0, 1, 2, 0]
    # a single-class support predicts that class
    assert classifiers.logistic(x[:3], y[:3], q).tolist() == [0, 0, 0, 0]


def test_sample_support_counts():
    y = torch.tensor([0] * 5 + [1] * 2 + [2] * 9)
    idx = fewshot.sample_support(y, 4, seed=3)
    assert torch.bincount(y[idx]).tolist() == [4, 2, 4]
    assert torch.equal(idx, fewshot.sample_support(y, 4, seed=3))
    assert not torch.equal(idx, fewshot.sample_support(y, 4, seed=4))


def test_fewshot_evaluate_hand_computed():
    # every class is a tight cluster: any support draw classifies the 3 clean queries right and
    # the one query placed on the wrong cluster wrong -> 0.75 for every method, k and seed
    centers = [0, 120, 240]
    x = _angles([c + d for c in centers for d in (-3, -1, 1, 3)])
    y = torch.tensor([i for i in range(3) for _ in range(4)])
    q = _angles([2, 118, 241, 239])
    qy = torch.tensor([0, 1, 2, 0])
    res = fewshot.evaluate(x, y, q, qy, shots=(1, 2), seeds=(0, 1, 2), knn_k=3)
    for m in fewshot.METHODS:
        for k in (1, 2):
            assert res[m][k]["runs"] == [0.75, 0.75, 0.75]
            assert res[m][k]["std"] == 0.0
    with pytest.raises(EvalError, match="unknown few-shot method"):
        fewshot.evaluate(x, y, q, qy, methods=("svm",))


def test_stratified_split():
    y = torch.tensor([0] * 10 + [1] * 5)
    tr, va = linear.stratified_split(y, 0.2, seed=0)
    assert torch.bincount(y[va]).tolist() == [2, 1]
    assert sorted(tr.tolist() + va.tolist()) == list(range(15))


def test_linear_sweep_picks_a_decay_and_scores_test():
    g = torch.Generator().manual_seed(0)
    centers = _angles([0, 120, 240])
    y = torch.arange(3).repeat(20)
    x = centers[y] + 0.05 * torch.randn(60, 2, generator=g)
    qy = torch.tensor([0, 1, 2, 1])
    q = centers[torch.tensor([0, 1, 2, 0])]  # the last query sits on the wrong class
    res = linear.sweep(x, y, q, qy, decays=(1e-4, 1e-2, 10.0))
    assert res["top1"] == 0.75
    assert res["weight_decay"] in (1e-4, 1e-2, 10.0)
    assert res["val_top1"][str(res["weight_decay"])] == max(res["val_top1"].values())
    with pytest.raises(EvalError, match="at least two classes"):
        linear.sweep(x[y == 0], y[y == 0], q, qy)


def test_linear_sweep_one_sample_per_class_is_an_eval_error():
    # e.g. `--limit 6` on ten classes: no class can spare a validation sample, and fitting the
    # decay sweep on an empty split crashed inside scikit-learn
    x, y = _angles([0, 120, 240]), torch.arange(3)
    assert linear.stratified_split(y, 0.2, seed=0)[1].numel() == 0
    with pytest.raises(EvalError, match="one sample per class"):
        linear.sweep(x, y, x, y)


def test_knn_labels_are_class_ids_not_column_indices():
    # a label -1 (e.g. "other") or a large id (a synset offset) indexed a (M, max + 1) vote
    # table: an IndexError, or gigabytes for one query; compare with explicit distances
    g = torch.Generator().manual_seed(0)
    x, q = torch.randn(12, 5, generator=g), torch.randn(7, 5, generator=g)
    ids = torch.tensor([-1, 7, 1_000_000_000])
    y = ids[torch.arange(12) % 3]
    k, t = 4, 0.5
    xs, qs = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(q, dim=1)
    want = []
    for row in qs:
        sims = [float(row @ s) for s in xs]
        nearest = sorted(range(12), key=lambda j: -sims[j])[:k]
        votes: dict[int, float] = {}
        for j in nearest:
            votes[int(y[j])] = votes.get(int(y[j]), 0.0) + math.exp(sims[j] / t)
        want.append(max(votes, key=votes.get))
    assert classifiers.knn(x, y, q, k=k, temperature=t).tolist() == want
    # relabelling the classes 0, 1, 2 gives the same choices
    dense = classifiers.knn(x, torch.arange(12) % 3, q, k=k, temperature=t)
    assert ids[dense].tolist() == want


def test_probes_refuse_features_that_are_not_finite():
    # a diverged model: prototype and kNN gave every NaN query the first class (a free 1/3
    # here) and the logistic probe died in a scikit-learn traceback
    x = _angles([0, 10, 120, 130, 240, 250])
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    q, qy = _angles([5, 125, 245]), torch.tensor([0, 1, 2])
    nan_q = q.clone()
    nan_q[1] = math.nan
    for methods in (("prototype",), ("knn",), ("logistic",)):
        with pytest.raises(EvalError, match="1 of 3 test feature rows are not finite"):
            fewshot.evaluate(x, y, nan_q, qy, shots=(1,), seeds=(0,), methods=methods)
    with pytest.raises(EvalError, match="6 of 6 train feature rows are not finite"):
        fewshot.evaluate(x * math.inf, y, q, qy, shots=(1,), seeds=(0,))
    for tx, qx in ((x, nan_q), (torch.full_like(x, math.nan), q)):
        with pytest.raises(EvalError, match="not finite"):
            linear.sweep(tx.repeat(2, 1), y.repeat(2), qx, qy, decays=(1e-2,))
    # finite features still score: every query is on its own cluster
    assert fewshot.evaluate(x, y, q, qy, shots=(1,), seeds=(0,), knn_k=1)["knn"][1]["runs"] == [1.0]


def test_fewshot_evaluate_refuses_a_repeated_shot_count():
    x, y = torch.eye(4), torch.tensor([0, 1, 0, 1])
    with pytest.raises(EvalError, match=r"shots repeat a value, got \[2, 1, 2\]"):
        fewshot.evaluate(x, y, x, y, shots=(2, 1, 2))
    assert fewshot.parse_ints("1, 2,4", "--shots") == [1, 2, 4]


def test_probes_refuse_a_repeated_method_or_decay():
    """From Python too: evaluate() returned one result for `methods=("knn", "knn")`, and
    sweep() fit a repeated decay twice and reported it once."""
    x = torch.eye(4).repeat(3, 1)
    y = torch.arange(4).repeat(3)
    with pytest.raises(EvalError, match=r"methods repeat knn, got \['knn', 'prototype', 'knn'\]"):
        fewshot.evaluate(x, y, x, y, shots=(1,), seeds=(0,), methods=("knn", "prototype", "knn"))
    with pytest.raises(EvalError, match=r"weight decays repeat 0.01, got \[0.01, 0.1, 0.01\]"):
        linear.sweep(x, y, x, y, decays=(0.01, 0.1, 0.01))
    assert fewshot.parse_list(" knn , logistic", "--methods", str, "names") == ["knn", "logistic"]


def test_knn_small_temperatures_do_not_overflow():
    """exp(similarity / temperature) was inf for every neighbour at temperature 0.001, so
    every class tied and the argmax took the first: accuracy fell from 0.99 to 0.61."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    y = torch.randint(0, 5, (200,), generator=g)
    query = torch.cat([torch.randn(40, 16, generator=g), x[:40] + 0.1 * torch.randn(40, 16)])

    def naive(k: int, t: float) -> torch.Tensor:
        sim = torch.nn.functional.normalize(query.double(), dim=-1) @ (
            torch.nn.functional.normalize(x.double(), dim=-1).T
        )
        top, idx = sim.topk(k, dim=1)
        w = torch.exp(top / t)
        assert torch.isfinite(w).all()  # the reference itself does not overflow here
        votes = torch.zeros(len(query), 5, dtype=torch.float64).scatter_add_(1, y[idx], w)
        return votes.argmax(1)

    for k, t in ((20, 0.07), (20, 0.01), (5, 0.002), (200, 0.0015)):
        assert torch.equal(classifiers.knn(x, y, query, k, t), naive(k, t))
    unit = torch.nn.functional.normalize
    nearest = y[(unit(query, dim=-1) @ unit(x, dim=-1).T).argmax(1)]
    for t in (1e-3, 1e-4, 1e-6):
        assert torch.equal(classifiers.knn(x, y, query, k=20, temperature=t), nearest)


@pytest.mark.parametrize("naming", ["identity", "reversed", "shuffled"])
def test_collapsed_features_score_the_tie_rule_whatever_the_labels_are_called(naming):
    """A collapsed encoder (every image the same feature) scores all classes equal; ties
    count against the model (metrics.predictions, as zero-shot does), so the probes are wrong
    everywhere.  They broke ties toward the smallest label id: 0.91 on a test split that is
    91% class 0, and 0.01 once that class is called 9."""
    names = {
        "identity": list(range(10)),
        "reversed": [9 - c for c in range(10)],
        "shuffled": [3, 7, 0, 9, 5, 1, 8, 2, 6, 4],
    }[naming]
    # train rows in blocks of 16 per class, the test split's majority class first
    train_y = torch.tensor([names[c] for c in range(10) for _ in range(16)])
    test_y = torch.tensor([names[0]] * 91 + names[1:])
    x, q = torch.ones(160, 8), torch.ones(100, 8)
    res = fewshot.evaluate(x, train_y, q, test_y, shots=(1, 16), seeds=(0, 1), knn_k=20)
    for m in ("logistic", "prototype"):
        assert res[m][1]["runs"] == res[m][16]["runs"] == [0.0, 0.0], m
    # 1-shot kNN: k = 10 neighbours, one per class, every class one equal vote
    assert res["knn"][1]["runs"] == [0.0, 0.0]
    # 16-shot kNN: 160 equally near rows share the 20 places, 2 votes a class (the first
    # 20 rows in support order gave the first block's class 16 of 20: the test split's
    # majority, 0.91)
    assert res["knn"][16]["runs"] == [0.0, 0.0]
    # the linear probe (same tie rule): every decay scores all classes equal
    lin = linear.sweep(x, train_y, q, test_y, decays=(1e-3, 1e-1))
    assert lin["top1"] == 0.0 and set(lin["val_top1"].values()) == {0.0}


def test_knn_rows_tied_with_the_kth_neighbour_share_its_places():
    # every support row equally near: torch.topk picked among them in no documented order
    # (row 8 of 10 here), so one class got the vote; the 10 tied rows share the k places
    x, q = torch.ones(10, 4), torch.ones(3, 4)
    y = torch.tensor([4, 9, 1, 7, 0, 3, 8, 2, 6, 5])
    for k in (1, 3):
        classes, votes = classifiers.knn_scores(x, y, q, k=k, temperature=0.1)
        assert classes.tolist() == list(range(10))
        torch.testing.assert_close(votes, torch.full((3, 10), k / 10, dtype=torch.float64))
    # hand-computed: sims 1, 0.6, 0.6, 0.6, 0 for k = 2: row 0 whole, rows 1-3 a third each
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8], [0.6, -0.8], [0.0, 1.0]])
    y = torch.tensor([0, 1, 2, 2, 0])
    classes, votes = classifiers.knn_scores(x, y, torch.tensor([[1.0, 0.0]]), k=2, temperature=0.5)
    w = math.exp((0.6 - 1.0) / 0.5) / 3
    torch.testing.assert_close(votes, torch.tensor([[1.0, w, 2 * w]], dtype=torch.float64))


def test_predict_counts_ties_against_the_model():
    # hand-computed: labels 5 and 7 tie at the top of row 0 -> a miss for label 5 (the rival
    # 7 is predicted) and for label 7 (5 is); a label the support never had is never hit
    classes = torch.tensor([2, 5, 7])
    scores = torch.tensor([[0.1, 0.9, 0.9], [0.8, 0.1, 0.1], [0.3, 0.2, 0.1]])
    assert classifiers.predict(classes, scores).tolist() == [5, 2, 2]
    assert classifiers.predict(classes, scores, torch.tensor([5, 2, 2])).tolist() == [7, 2, 2]
    assert classifiers.predict(classes, scores, torch.tensor([7, 2, 4])).tolist() == [5, 2, 2]


@pytest.mark.parametrize("text", ["", " ", ",", " , "])
def test_empty_option_lists_are_refused(text):
    # `fewshot --shots ''` and `--methods ''` ran nothing and exited 0 with empty results
    # (while `linear --decays ''` was refused); lm --shots parses the same way
    for name, kind, what in (("--shots", int, "integers"), ("--methods", str, "method names")):
        with pytest.raises(EvalError, match=rf"^{name} is empty \(got '{text}'\)"):
            fewshot.parse_list(text, name, kind, what)
    with pytest.raises(EvalError, match=r"^--shots is empty"):
        fewshot.parse_ints(text, "--shots")


def test_fewshot_seeds_draw_their_own_supports(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    draw = fewshot.sample_support
    monkeypatch.setattr(fewshot, "sample_support", lambda y, k, s: seen.append(s) or draw(y, k, s))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=g), torch.arange(4).repeat(10)
    fewshot.evaluate(x, y, x, y, shots=(1,), seeds=(0, 1, 2), methods=("prototype",))
    assert seen == [0, 1, 2]


def test_linear_sweep_refits_on_all_train_and_ties_take_the_stronger_decay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    fit = classifiers.fit_logistic

    def spy(x, y, decay, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((len(y), decay))
        return fit(x, y, decay, *args, **kwargs)

    monkeypatch.setattr(classifiers, "fit_logistic", spy)
    g = torch.Generator().manual_seed(0)
    x = torch.tensor([[1.0, 0], [0, 1.0]]).repeat(10, 1) + 0.01 * torch.randn(20, 2, generator=g)
    y = torch.tensor([0, 1]).repeat(10)
    res = linear.sweep(x, y, x, y, decays=(1e-4, 1e-3))
    assert calls[-1][0] == 20  # the final fit: all of train, not the sub-split
    assert res["val_top1"]["0.0001"] == res["val_top1"]["0.001"]
    assert res["weight_decay"] == 1e-3


def test_prototype_is_the_mean_of_normalised_features() -> None:
    x = torch.tensor([[10.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    y = torch.tensor([0, 0, 1])
    _, s = classifiers.prototype_scores(x, y, torch.tensor([[1.0, 1.0]]))
    # class 0: normalise(mean([1, 0], [0, 1])) = [0.707, 0.707], cosine 1 with [1, 1]
    assert s[0, 0].item() == pytest.approx(1.0)
