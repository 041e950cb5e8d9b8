"""Scores of degenerate models against hand-computed values (metrics, LM scoring)."""

from __future__ import annotations

import math

import pytest
import torch

from mmssl.eval.lm import stream_nll
from mmssl.eval.metrics import perplexity


def test_perplexity_of_a_confidently_wrong_model_is_inf():
    # a diverged LM: every logit 0 but a wrong token's at 2000, so each target costs 2000
    # nats (hand-computed: log(exp(2000) + V - 1) - 0); exp(2000) is past float range
    vocab = 5

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*ids.shape, vocab, dtype=torch.float64)
        return out.scatter(-1, ((ids + 1) % vocab)[..., None], 2000.0)

    # rows of 4 tokens: 3 + 2 targets, always 0, while the model favours token 1
    tokens = [0, 0, 0, 0, 0, 0, 0]
    total, count, _ = stream_nll(logits_fn, tokens, context_length=3)
    assert count == 5 and total / count == pytest.approx(2000.0)
    assert perplexity(total, count) == math.inf
    assert perplexity(700.0, 1) == math.exp(700.0)  # still finite just below the range


def test_zeroshot_prompts_file_refuses_repeated_class_names(tmp_path):
    import json

    from mmssl.eval.loading import EvalError
    from mmssl.eval.zeroshot import load_classes, score

    # per-class accuracy is keyed by name: two classes called "cat" left one row for both
    emb = torch.eye(3)
    res = score(emb, emb, torch.arange(3), ["cat", "cat", "dog"])
    assert len(res["per_class"]) == 2  # what a repeated name does to the results
    path = tmp_path / "classes.json"
    prompts = [["a cat."], ["a kitten."], ["a dog."]]
    path.write_text(json.dumps({"classnames": ["cat", "cat", "dog"], "prompts": prompts}))
    with pytest.raises(EvalError, match="repeat"):
        load_classes(str(path))
    path.write_text(json.dumps({"classnames": ["cat", "", "dog"], "prompts": prompts}))
    with pytest.raises(EvalError, match="non-empty"):
        load_classes(str(path))
    path.write_text(json.dumps({"classnames": ["cat", "kitten", "dog"], "prompts": prompts}))
    assert load_classes(str(path)).prompts == prompts


def test_zeroshot_score_without_labels_is_a_clear_error():
    """score() from Python with no labels raised metrics' bare ValueError ("no samples to
    score"), and with fewer labels than images a shape ValueError from deep inside."""
    from mmssl.eval.loading import EvalError
    from mmssl.eval.zeroshot import score

    emb = torch.eye(3)
    with pytest.raises(EvalError, match="got no labels: there are no images to classify"):
        score(emb[:0], emb, torch.zeros(0, dtype=torch.long), ["a", "b", "c"])
    with pytest.raises(
        EvalError, match=r"one label per image: 3 image embeddings, labels of shape \(2,\)"
    ):
        score(emb, emb, torch.arange(2), ["a", "b", "c"])
    assert score(emb, emb, torch.arange(3), ["a", "b", "c"])["top1"] == 1.0
