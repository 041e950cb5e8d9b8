"""mmssl eval lm: k-shot prompts never show the item its own answer; the unigram baseline is
fit on --train-data when given (add-one counts worked out by hand)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mmssl.eval import lm


class OrdTokenizer:
    eos_id, vocab_size = 1, 128

    def encode(self, text, add_bos=False, add_eos=False):
        return [ord(c) for c in text]


def test_shots_are_the_other_items_never_the_item_itself():
    items = [{"context": f"q{i}", "choices": [f"A{i}", f"B{i}"], "answer": 0} for i in range(6)]
    seen = []

    def logits_fn(x):
        seen.extend("".join(chr(t) for t in row.tolist() if t > 1) for row in x)
        return torch.zeros(*x.shape, 128)

    lm.score_task(logits_fn, OrdTokenizer(), items, shots=5, context_length=512, seed=0)
    assert seen
    for row in seen:
        own = row.split(lm.SEP)[-1].split(" ")[0]  # the scored item's context, e.g. "q3"
        shots = row.split(lm.SEP)[:-1]
        assert len(shots) == 5
        assert all(not s.startswith(own + " ") for s in shots), row  # no answer leak
        assert sorted(s.split(" ")[0] for s in shots) == sorted(
            f"q{j}" for j in range(6) if f"q{j}" != own
        )


def test_unigram_baseline_is_fit_on_the_train_text(monkeypatch):
    import mmssl.eval.data as data

    docs = {"eval": ["ab"], "train": ["aaaa"]}
    monkeypatch.setattr(data, "shard_urls", lambda p: p)
    monkeypatch.setattr(data, "iter_documents", lambda p: iter(docs[p]))
    V = 128
    model = SimpleNamespace(
        lm_logits=lambda x: torch.zeros(*x.shape, V),
        cfg=SimpleNamespace(text=SimpleNamespace(context_length=8, vocab_size=V)),
    )
    res = lm.perplexity_report(model, OrdTokenizer(), "eval", "train", None)
    # eval stream "a b eos": targets b, eos.  train stream: a a a a eos (5 tokens), add-one
    p_b, p_eos = 1 / (5 + V), 2 / (5 + V)
    want = math.exp(-(math.log(p_b) + math.log(p_eos)) / 2)
    assert res["unigram_perplexity"] == pytest.approx(want)
    assert res["unigram_fit_on"] == "train"
