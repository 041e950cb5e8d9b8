"""A condition prompt is the whole prompt, [bos] + ids + [eos], not a cut one: run on its
own (no caption batch on its source) and beside captions shorter than it."""

from __future__ import annotations

import torch

import mmssl
from mmssl.train.tasks import Task
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


LONG = "a red car on a street"  # [bos] + 8 ids + [eos] = 10 tokens with the default tokenizer


def _model(tok):
    torch.manual_seed(0)
    model = mmssl.create_model(
        "test_tiny_clip",
        text={"vocab_size": tok.vocab_size},
        vision={"cond_dim": 16},
        condition={"source": "text", "dim": 16},
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name or "gate" in name or "conditioner" in name:
                p.normal_(0, 0.5)
    return model


def test_training_conditions_on_the_whole_prompt_that_export_records():
    """A prompt longer than its source's captions (10 tokens against 8) conditions training
    whole, as config.json records it and an exported model conditions cond=None on it: it
    was cut to the captions' length (its eos kept), another condition than the export's."""
    from mmssl.tokenizer import get_tokenizer
    from mmssl.train.recipe import recipe_from_dict
    from mmssl.train.streams import build_streams
    from mmssl.train.text_condition import export_record

    tok = get_tokenizer()
    recipe = recipe_from_dict(
        {
            "model": {"name": "test_tiny_clip"},
            "data": {"sources": {"train": {"urls": "synthetic", "kind": "image_text"}}},
            "objectives": {"clip": {"source": "train", "condition_prompt": LONG}},
            "train": {"steps": 1, "global_batch_size": 4, "micro_batch_size": 4},
        }
    )
    model = _model(tok)
    batch = build_streams(recipe, model.cfg, 0, 1)["train"].next()  # captions (4, 8)
    recorded = export_record(recipe, model.cfg.text.context_length)["prompts"]["train"]["ids"]
    assert recorded == tok.encode(LONG, add_bos=True, add_eos=True) and len(recorded) == 10

    task = Task(model, recipe.objectives)
    with torch.no_grad():
        _, prompt_pooled = task._text({"train": batch})
        # what the exported model conditions cond=None on: the recorded ids
        want = model.text.forward_pooled(torch.tensor([recorded]), None)
    torch.testing.assert_close(prompt_pooled["train"], want, atol=1e-5, rtol=1e-5)
