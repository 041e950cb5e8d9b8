"""Metrics against hand-computed values on constructed scores."""

from __future__ import annotations

import math

import pytest
import torch

from mmssl.eval import metrics


def test_topk_hand_computed():
    logits = torch.tensor(
        [
            [0.9, 0.05, 0.03, 0.02],  # label 0: rank 0
            [0.1, 0.2, 0.6, 0.1],  # label 1: rank 1
            [0.5, 0.1, 0.15, 0.25],  # label 2: rank 2
            [0.4, 0.3, 0.2, 0.1],  # label 3: rank 3
        ]
    )
    labels = torch.tensor([0, 1, 2, 3])
    acc = metrics.topk_accuracy(logits, labels, (1, 2, 3, 5))
    assert acc == {1: 0.25, 2: 0.5, 3: 0.75, 5: 1.0}


def test_topk_ties_count_against_the_model():
    logits = torch.zeros(4, 3)  # a collapsed model: every class scores the same
    acc = metrics.topk_accuracy(logits, torch.tensor([0, 1, 2, 0]), (1, 3))
    assert acc[1] == 0.0 and acc[3] == 1.0


def test_nan_scores_count_against_the_model():
    # a diverged run: NaN embeddings must not score a perfect top-k or recall
    nan = torch.full((3, 3), math.nan)
    labels = torch.tensor([0, 1, 2])
    assert metrics.topk_accuracy(nan, labels, (1, 3)) == {1: 0.0, 3: 1.0}
    assert metrics.recall_at_k(nan, torch.eye(3, dtype=torch.bool), (1, 2)) == {1: 0.0, 2: 0.0}
    # one NaN competitor outranks the target; a NaN target is outranked by everything
    logits = torch.tensor([[0.9, math.nan, 0.1], [math.nan, 0.2, 0.1]])
    assert metrics.topk_accuracy(logits, torch.tensor([0, 0]), (1, 2, 3)) == {
        1: 0.0,
        2: 0.5,
        3: 1.0,
    }


def test_predictions_agree_with_top1():
    # ties and NaN go against the label, so pred == label exactly where top-1 hits
    logits = torch.tensor(
        [
            [0.5, 0.5, 0.1],  # label 0 tied with 1 -> predicts 1
            [0.2, 0.7, 0.1],  # label 1 strict max -> 1
            [0.3, 0.2, 0.3],  # label 2 tied with 0 -> predicts 0
            [0.1, math.nan, 0.9],  # label 2 behind a NaN -> predicts 1
            [0.4, 0.6, 0.0],  # label 0 beaten -> the argmax, 1
        ]
    )
    labels = torch.tensor([0, 1, 2, 2, 0])
    pred = metrics.predictions(logits, labels)
    assert pred.tolist() == [1, 1, 0, 1, 1]
    assert float((pred == labels).double().mean()) == metrics.topk_accuracy(logits, labels, (1,))[1]
    collapsed = metrics.predictions(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]))
    assert (collapsed != torch.tensor([0, 1, 2, 0])).all()


def test_topk_bad_labels():
    with pytest.raises(ValueError, match="labels must be in"):
        metrics.topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_confusion_and_per_class():
    pred = torch.tensor([0, 0, 1, 2, 2, 2])
    labels = torch.tensor([0, 1, 1, 2, 2, 0])
    cm = metrics.confusion_matrix(pred, labels, 4)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in zip(labels.tolist(), pred.tolist()):
        expected[t, p] += 1
    assert torch.equal(cm, expected)
    per = metrics.per_class_accuracy(pred, labels, 4)
    assert per[:3] == [0.5, 0.5, 1.0] and math.isnan(per[3])
    assert metrics.mean_per_class_accuracy(pred, labels, 4) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "pred, labels, what",
    [([0, 5], [0, 1], "predictions"), ([0, -1], [0, 1], "predictions"), ([0, 1], [0, 3], "labels")],
)
def test_confusion_refuses_classes_outside_the_range(pred, labels, what):
    # pred 5 of 3 classes was counted as a correct class-2 prediction (cell (2, 2))
    with pytest.raises(ValueError, match=f"{what} must be in \\[0, 3\\)"):
        metrics.confusion_matrix(torch.tensor(pred), torch.tensor(labels), 3)
    with pytest.raises(ValueError, match=what):
        metrics.per_class_accuracy(torch.tensor(pred), torch.tensor(labels), 3)


def test_recall_three_of_four():
    # 4 queries x 4 items; the diagonal is the match; query 2 ranks its match second
    emb = torch.eye(4)
    queries = emb.clone()
    queries[2] = torch.tensor([0.0, 0.9, 0.5, 0.0])
    r = metrics.recall_at_k(queries @ emb.T, torch.eye(4, dtype=torch.bool), (1, 2, 5))
    assert r == {1: 0.75, 2: 1.0, 5: 1.0}


def test_recall_multiple_positives():
    # query 0 has two positives; its best positive (item 2) is beaten by item 1 only
    scores = torch.tensor([[0.1, 0.8, 0.5, 0.9], [0.9, 0.1, 0.2, 0.3]])
    pos = torch.tensor([[True, False, True, False], [True, False, False, False]])
    r = metrics.recall_at_k(scores, pos, (1, 2, 3))
    # query 0: non-positives >= 0.5 are items 1 and 3 -> rank 2 -> miss at 1 and 2
    assert r == {1: 0.5, 2: 0.5, 3: 1.0}
    with pytest.raises(ValueError, match="at least one positive"):
        metrics.recall_at_k(scores, torch.zeros(2, 4, dtype=torch.bool))


def test_pair_positives():
    pos = metrics.pair_positives(torch.arange(2), torch.tensor([0, 0, 1]))
    assert pos.tolist() == [[True, True, False], [False, False, True]]


def test_perplexity_and_unigram():
    assert metrics.perplexity(4 * math.log(8), 4) == pytest.approx(8.0)
    # counts (3, 1) with add-one: p = (4/6, 2/6); tokens [0, 1]: ppl = exp(-(ln 2/3 + ln 1/3) / 2)
    ppl = metrics.unigram_perplexity(torch.tensor([3, 1]), torch.tensor([0, 1]))
    assert ppl == pytest.approx(math.exp(-(math.log(2 / 3) + math.log(1 / 3)) / 2))
    # uniform counts give the vocabulary size
    assert metrics.unigram_perplexity(torch.ones(10), torch.arange(10)) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        metrics.perplexity(1.0, 0)


def test_zeroshot_per_class_agrees_with_top1_on_a_collapsed_model():
    from mmssl.eval import zeroshot

    same = torch.ones(6, 4) / 2  # every image and class embedding equal: all scores tie
    r = zeroshot.score(same, torch.ones(3, 4) / 2, torch.tensor([0, 1, 2, 0, 1, 2]), list("abc"))
    assert r["top1"] == 0.0 and r["per_class"] == {"a": 0.0, "b": 0.0, "c": 0.0}
    assert r["confusion"].diagonal().sum() == 0


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 24])
def test_retrieval_scored_in_blocks_equals_the_whole_matrix(block):
    """retrieval held the whole (I, T) similarity matrix, float64 copies and masks (34 GB
    at 40k images); it scores blocks of queries now, with recall_at_k's counts."""
    from mmssl.eval import retrieval

    g = torch.Generator().manual_seed(0)
    num_images = 13
    per_image = torch.randint(1, 4, (num_images,), generator=g)
    image_of_text = torch.repeat_interleave(torch.arange(num_images), per_image)
    captions = [f"c{int(i)}" for i in torch.randint(0, 9, (len(image_of_text),), generator=g)]
    image_emb = torch.nn.functional.normalize(torch.randn(num_images, 4, generator=g), dim=-1)
    text_emb = torch.nn.functional.normalize(torch.randn(len(captions), 4, generator=g), dim=-1)
    text_emb[3] = text_emb[5]  # a tie
    sim = image_emb @ text_emb.T
    for caps in (None, captions):
        pos = retrieval.positives(image_of_text, num_images, caps)
        group = retrieval.caption_groups(image_of_text, caps)
        got = retrieval.score(image_emb, text_emb, image_of_text, group, block=block)
        for direction, (s, p) in {"i2t": (sim, pos), "t2i": (sim.T, pos.T)}.items():
            for k, v in metrics.recall_at_k(s, p, (1, 5, 10)).items():
                assert got[f"{direction}_R@{k}"] == v, (direction, k, caps)


def test_recall_ties_count_against_the_model() -> None:
    """All scores equal: the right item is not ranked first (as top-k: ties count against)."""
    r = metrics.recall_at_k(torch.zeros(4, 4), torch.eye(4, dtype=torch.bool), (1, 4))
    assert r[1] == 0.0 and r[4] == 1.0


def test_retrieval_mean_recall_is_the_mean_of_both_directions() -> None:
    from mmssl.eval import retrieval

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 4, generator=g), dim=-1)
    out = retrieval.score(img, txt, torch.arange(6), ks=(1, 2))
    vals = [v for k, v in out.items() if k != "mean_recall"]
    assert len(vals) == 4 and out["mean_recall"] == pytest.approx(sum(vals) / 4)


def test_a_nan_score_of_the_positive_counts_against_the_model() -> None:
    """One diverged gallery embedding: the positive's NaN score is ahead of nothing, so the
    finite negatives rank before it (as topk_accuracy treats a NaN target)."""
    scores = torch.tensor([[math.nan, 0.1, 0.2]])
    positives = torch.tensor([[True, False, False]])
    assert metrics.recall_at_k(scores, positives, (1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 1.0}
