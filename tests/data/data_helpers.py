"""Helpers for the data tests: tiny synthetic shards written with ShardWriter, a stub tokenizer."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from mmssl.data.shards import ShardWriter


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def png_flipped(arr: np.ndarray, where: str) -> bytes:
    """`arr` as a PNG with one bit of its IDAT flipped: "crc" in the chunk's CRC (PIL still
    decodes it), "data" in the middle of its compressed data."""
    data = bytearray(png_bytes(arr))
    pos = data.index(b"IDAT") - 4
    n = int.from_bytes(data[pos : pos + 4], "big")
    data[pos + 8 + (n if where == "crc" else n // 2)] ^= 1
    return bytes(data)


def write_image_shards(
    out: str, shards: int = 8, per_shard: int = 6, size: int = 8, split: str = "train"
) -> str:
    """`shards` x `per_shard` coloured squares with captions and json; returns the pattern."""
    rng = np.random.default_rng(0)
    writer = ShardWriter(out, split, max_count=per_shard)
    for i in range(shards * per_shard):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        writer.write(
            {
                "__key__": f"s{i:05d}",
                "png": png_bytes(arr),
                "txt": f"sample number {i}",
                "json": {"label": i % 3, "index": i},
            }
        )
    writer.close()
    return os.path.join(out, writer.pattern)


class StubTokenizer:
    """The tokenizer interface with a trivial character code (fast, independent)."""

    eos_id = 1
    pad_id = 0

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return [3 + ord(c) % 97 for c in text]

    def batch_encode(self, texts, context_length, add_bos=True, add_eos=True):
        import torch

        ids = torch.zeros(len(texts), context_length, dtype=torch.int64)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for i, t in enumerate(texts):
            e = self.encode(t)[:context_length]
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = True
        return ids, mask
