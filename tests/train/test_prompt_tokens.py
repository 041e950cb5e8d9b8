"""A condition prompt run on its own (no caption batch on its source) is the whole prompt,
[bos] + ids + [eos], not a cut one."""

from __future__ import annotations

import torch

from mmssl.train.text_condition import PromptTokens


class WordTok:
    bos_id, eos_id = 1, 2

    def encode(self, text, add_bos=False, add_eos=False):
        ids = [10 + len(w) for w in text.split()]
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def batch_encode(self, texts, length):  # [bos] + ids + [eos], cut with eos kept, padded
        rows = []
        for t in texts:
            ids = self.encode(t, True, True)
            ids = ids[: length - 1] + [self.eos_id] if len(ids) > length else ids
            rows.append(ids + [0] * (length - len(ids)))
        ids = torch.tensor(rows)
        return ids, ids != 0


def test_natural_length_holds_the_whole_prompt():
    tok = WordTok()
    prompt = "a photo of a digit"
    want = tok.encode(prompt, add_bos=True, add_eos=True)
    p = PromptTokens({"digits": prompt}, tok, context_length=64)
    n = p.natural_length("digits")
    assert n == len(want)
    ids, mask = p.get("digits", n, torch.device("cpu"))
    assert ids[0].tolist() == want and bool(mask.all())
    assert PromptTokens({"d": prompt}, tok, context_length=3).natural_length("d") == 3
