"""Helpers for the eval tests: tiny labelled shards and a tiny exported CLIP model."""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

from mmssl.data.shards import ShardWriter

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
NAMES = ["red", "green", "blue"]


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def write_labelled_shards(
    out: str,
    n: int = 12,
    per_shard: int = 5,
    split: str = "test",
    labels: bool = True,
    size: int = 32,
) -> str:
    """`n` noisy squares tinted by class i % 3, caption "a photo of a <colour> square." (and
    json label/color unless `labels` is False); returns the shard pattern."""
    rng = np.random.default_rng(0)
    writer = ShardWriter(out, split, max_count=per_shard)
    for i in range(n):
        c = i % 3
        arr = (rng.random((size, size, 1)) * np.array(COLORS[c])).astype(np.uint8)
        sample = {
            "__key__": f"k{i:04d}",
            "png": png_bytes(arr),
            "txt": f"a photo of a {NAMES[c]} square.",
        }
        sample["json"] = {"label": c, "color": c, "index": i} if labels else {"index": i}
        writer.write(sample)
    writer.close()
    return os.path.join(out, writer.pattern)


def write_text_shards(out: str, docs: list[str], split: str = "validation") -> str:
    writer = ShardWriter(out, split, max_count=3)
    for i, d in enumerate(docs):
        writer.write({"__key__": f"d{i:04d}", "txt": d})
    writer.close()
    return os.path.join(out, writer.pattern)


def make_tiny_model_dir(out: str, tokenizer, seed: int = 0, **overrides) -> str:
    """An exported test_tiny_clip sized for the tokenizer, with its metadata in config.json;
    `overrides` of its config as create_model takes them."""
    from mmssl.models.io import save_pretrained
    from mmssl.models.registry import create_model

    torch.manual_seed(seed)
    text = {"vocab_size": tokenizer.vocab_size, **overrides.pop("text", {})}
    model = create_model("test_tiny_clip", text=text, **overrides)
    save_pretrained(model, out, extra={"tokenizer": tokenizer.metadata})
    return out
