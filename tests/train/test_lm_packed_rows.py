"""Next-token training reads packed LM rows as nanoGPT does (x = row[:-1], y = row[1:]):
every position of the context has a target.  Before, rows were packed one token shorter
than the context and the tower read them whole, so its last position never had a target:
gpt_124m's position row 1023 got no gradient, and with decay_embeddings AdamW decayed it to
~0 (x 2.5e-9 over the recipe's schedule), the row that generation at a full context reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmssl.data.shards import ShardWriter
from mmssl.train.loop import build_task
from mmssl.train.recipe import load_recipe, model_config
from mmssl.train.streams import build_stream

DOCS = [f"document number {i} says the quick brown fox jumps over dog {i % 7}." for i in range(60)]


def _recipe(tmp_path: Path, urls: str) -> object:
    overrides = [
        "model.name=test_tiny_gpt",
        "model.overrides={text: {vocab_size: 8192}}",  # the default tokenizer's ids
        "data.context_length=null",
        f"data.sources.owt.urls={urls}",
        "train.micro_batch_size=4",
        "train.global_batch_size=4",
        "precision=fp32",
    ]
    return load_recipe(Path(__file__).parents[2] / "recipes" / "gpt_124m.yaml", overrides)


def _shards(tmp_path: Path) -> str:
    writer = ShardWriter(str(tmp_path), "train", max_count=20)
    for i, doc in enumerate(DOCS):
        writer.write({"__key__": f"d{i:04d}", "txt": doc})
    writer.close()
    return str(tmp_path / writer.pattern)


def _image_shards(out: Path) -> str:
    import io

    from PIL import Image

    writer = ShardWriter(str(out), "train", max_count=4)
    for i in range(8):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(buf, "PNG")
        writer.write({"__key__": f"i{i:04d}", "png": buf.getvalue(), "txt": "a square"})
    writer.close()
    return str(out / writer.pattern)


@pytest.mark.parametrize("source", ["shards", "synthetic"])
def test_every_position_trains_and_the_loss_is_nanogpts(tmp_path, source):
    recipe = _recipe(tmp_path, _shards(tmp_path) if source == "shards" else "synthetic")
    cfg = model_config(recipe)
    ctx = cfg.text.context_length
    torch.manual_seed(0)
    task = build_task(recipe, cfg).train()
    batch = build_stream("owt", recipe.data.sources["owt"], recipe, cfg, 0, 1).next()
    row = batch["text"]
    assert row.shape == (4, ctx + 1) and batch["text_mask"].all()  # the pipeline's packed rows
    loss, _ = task({"owt": batch})
    loss.backward()
    model = task.model
    with torch.no_grad():  # nanoGPT: logits of x = row[:, :-1] against y = row[:, 1:]
        logits = model.lm_logits(row[:, :-1])
        want = F.cross_entropy(logits.flatten(0, 1), row[:, 1:].flatten())
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    grad = model.text.pos_embed.grad.reshape(ctx, -1).norm(dim=-1)
    assert (grad > 0).all(), f"position rows without a gradient: {(grad == 0).nonzero().tolist()}"


def test_targets_of_a_packed_row_and_of_aligned_text():
    """The objectives take tokens as long as the positions (the last without a target, as
    captions) or one longer (a packed row: its last token is the last position's target)."""
    from mmssl.objectives.lm import count_targets, next_token_sum

    logits = torch.randn(2, 5, 11)
    row = torch.randint(0, 11, (2, 6))
    total, count = next_token_sum(logits, row)
    assert count == 10  # 5 positions x 2 rows
    torch.testing.assert_close(
        total, F.cross_entropy(logits.flatten(0, 1), row[:, 1:].flatten(), reduction="sum")
    )
    total, count = next_token_sum(logits, row[:, :5])
    assert count == 8 and count_targets(row) == 10 and count_targets(row[:, :5]) == 8
    with pytest.raises(ValueError, match=r"or a packed row \(B, T \+ 1\)"):
        next_token_sum(logits, row[:, :4])


def test_a_data_state_of_the_shorter_rows_is_refused_for_text_only(tmp_path):
    """A version-4 data state of a text source continued with rows cut otherwise: refused,
    saying why; an image source's version-4 state still loads (its stream is the same)."""
    from mmssl.data.errors import DataError
    from mmssl.data.pipeline import Source, build_pipeline
    from mmssl.tokenizer import get_tokenizer

    urls = _shards(tmp_path)
    text = build_pipeline(
        sources=[Source(urls, kind="text", name="t")],
        batch_size=2,
        rank=0,
        world_size=1,
        tokenizer=get_tokenizer(),
        context_length=16,
    )
    assert next(iter(text))["text"].shape == (2, 17)
    with pytest.raises(DataError, match="packed LM rows one token shorter"):
        text.load_state_dict({**text.state_dict(), "version": 4})
    images = build_pipeline(
        _image_shards(tmp_path / "img"), batch_size=2, rank=0, world_size=1, image_size=8
    )
    images.load_state_dict({**images.state_dict(), "version": 4})


def test_a_version_5_data_state_of_an_epoch_text_source_with_bad_documents_is_refused(
    tmp_path,
):
    """Version 5 started a text source's epoch runs past the bad documents at a cut: with a
    bad document its epoch-mode state would go on at another document, so it is refused;
    without one (the same runs), or in resampled mode, a version-5 state loads."""
    from mmssl.data.errors import DataError
    from mmssl.data.pipeline import Source, build_pipeline
    from mmssl.data.shards import ShardWriter
    from mmssl.tokenizer import get_tokenizer

    def shard(folder, bad: bool) -> str:
        with ShardWriter(str(tmp_path / folder), "t", max_count=8) as w:
            for i in range(8):
                text = "" if bad and i == 3 else f"document {i} " * 5
                w.write(
                    {"__key__": f"d{i}", "txt": text} if text else {"__key__": f"d{i}", "json": {}}
                )
        return str(tmp_path / folder / "t-000000.tar")

    for mode, bad, refused in [
        ("epoch", True, True),
        ("epoch", False, False),
        ("resampled", True, False),
    ]:
        pl = build_pipeline(
            sources=[Source(shard(f"{mode}{bad}", bad), kind="text", name="t")],
            batch_size=1, mode=mode, rank=0, world_size=1,
            tokenizer=get_tokenizer(), context_length=16,
        )  # fmt: skip
        next(iter(pl))
        old = {**pl.state_dict(), "version": 5}
        if not refused:
            pl.load_state_dict(old)
            continue
        with pytest.raises(DataError, match="data state version 5 was saved when a text source"):
            pl.load_state_dict(old)
