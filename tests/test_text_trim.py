"""Skipping the all-padding tail of a text batch (`trim_padding`) changes no output."""

from __future__ import annotations

import pytest
import torch

from mmssl.models import MultimodalModel, resolve_model_config
from mmssl.models.text_masks import trim_padding


def _captions(vocab: int, t: int = 32, lengths=(5, 9, 3, 12)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, vocab, (len(lengths), t), generator=g)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    return text.masked_fill(~mask, 0), mask


def test_trim_keeps_every_valid_column_rounded_to_eight() -> None:
    text, mask = _captions(50)
    t2, m2 = trim_padding(text, mask)
    assert t2.shape == m2.shape == (4, 16)  # longest caption 12 -> 16
    assert torch.equal(t2, text[:, :16]) and not mask[:, 16:].any()
    assert trim_padding(text, None)[0] is text  # no mask: nothing is known to be padding
    full = torch.ones_like(mask)
    assert trim_padding(text, full)[0].shape[1] == 32
    empty = torch.zeros_like(mask)
    assert trim_padding(text, empty)[0].shape[1] == 8  # pooling still gets a column
    assert trim_padding(text, mask, multiple=1)[0].shape[1] == 12


def test_trim_does_not_round_past_the_context_length() -> None:
    """Captions in 32 columns whose longest has 12 tokens, for a 14-token context: rounded to
    16, encode_text refused them as "text length 16 exceeds context_length 14"."""
    text, mask = _captions(50)
    assert trim_padding(text, mask, limit=14)[0].shape[1] == 14
    assert trim_padding(text, mask, limit=20)[0].shape[1] == 16  # rounding as before
    assert trim_padding(text, mask, limit=10)[0].shape[1] == 12  # the real length, refused
    cfg = resolve_model_config("test_tiny_clip", text={"context_length": 14})
    model = MultimodalModel(cfg).double().eval()
    want = model.encode_text(text[:, :14], mask[:, :14])
    torch.testing.assert_close(model.encode_text(text, mask), want, rtol=1e-12, atol=1e-12)
    long = mask.clone()
    long[0, :15] = True  # 15 real tokens: the error names 15, not the rounded 16
    with pytest.raises(ValueError, match="text length 15 exceeds context_length 14"):
        model.encode_text(text, long)


@pytest.mark.parametrize("causal, pool", [(True, "eot"), (False, "mean")])
def test_encode_text_equals_the_untrimmed_tower(causal: bool, pool: str) -> None:
    cfg = resolve_model_config(
        "test_tiny_clip", text={"causal": causal, "pool": pool, "context_length": 32}
    )
    torch.manual_seed(0)
    model = MultimodalModel(cfg).double().eval()
    text, mask = _captions(cfg.text.vocab_size)
    tower = model.text
    untrimmed = tower.forward_features(text, mask)["pooled"]  # all 32 columns
    if tower.proj is not None:
        untrimmed = tower.proj(untrimmed)
    torch.testing.assert_close(model.encode_text(text, mask), untrimmed, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "model, objectives",
    [
        ("test_tiny_clip", {"clip": {}}),
        ("test_tiny_coca", {"clip": {}, "captioning": {}}),
        ("test_tiny_coca_prefix", {"captioning": {"fused_head": False}}),
    ],
)
def test_trainer_loss_and_gradients_equal_the_untrimmed_path(monkeypatch, model, objectives):
    from mmssl.train import tasks
    from mmssl.train.recipe import recipe_from_dict, validate

    text, mask = _captions(50)
    batch = {"text": text, "text_mask": mask, "image": torch.rand(4, 3, 32, 32)}
    out = []
    for trim in (True, False):
        if not trim:
            monkeypatch.setattr(tasks, "trim_padding", lambda t, m: (t, m))
        recipe = recipe_from_dict(
            {
                "model": {"name": model, "overrides": {"text": {"context_length": 32}}},
                "data": {"views": 0, "sources": {"train": {"urls": "synthetic"}}},
                "objectives": objectives,
            }
        )
        resolved = validate(recipe, world_size=1, check_files=False)
        torch.manual_seed(0)
        task = tasks.Task(MultimodalModel(resolved.model), recipe.objectives).double()
        loss, _ = task(
            {"train": {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}}
        )
        loss.backward()
        out.append([loss.detach()] + [p.grad for p in task.parameters() if p.grad is not None])
    assert len(out[0]) == len(out[1]) > 1
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_text_mask_of_another_shape_is_refused_and_01_masks_are_read() -> None:
    # a (1, T) mask pooled every row at row 0's last token; a (B, T - 2) one pooled before
    # the text's end; an int64 mask (Hugging Face's attention_mask) failed in torch.where
    torch.manual_seed(0)
    model = MultimodalModel(resolve_model_config("test_tiny_clip")).eval()
    vocab = model.cfg.text.vocab_size
    text, mask = _captions(vocab, t=16, lengths=(4, 16))
    want = model.encode_text(text, mask)
    for bad in (mask[:1], mask[:, :14], torch.ones(2, 18, dtype=torch.bool)):
        for call in (model.encode_text, model.text.forward_features, model.text.forward_tokens):
            with pytest.raises(ValueError, match="text_mask must have the text's shape"):
                call(text, bad)
    for as_number in (mask.long(), mask.float()):
        torch.testing.assert_close(model.encode_text(text, as_number), want, rtol=0, atol=0)
