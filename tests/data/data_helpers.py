"""Helpers for the data tests: tiny synthetic shards written with ShardWriter, a stub tokenizer."""

from __future__ import annotations

import io
import os
import struct
import zlib

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


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with its correct CRC."""
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_with_data(
    w: int, h: int, idat: bytes, interlace: int = 0, colour: int = 2, depth: int = 8
) -> bytes:
    """A PNG of the given header whose one IDAT holds `idat` as it is (compressed image
    data, right or wrong): every chunk's CRC is correct."""
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, interlace)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def adam7_rows(arr: np.ndarray) -> bytes:
    """The inflated image data of an 8-bit (H, W, C) image, Adam7-interlaced, filter 0."""
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2))
    out = b""
    for x0, y0, dx, dy in passes + ((0, 1, 1, 2),):
        sub = arr[y0::dy, x0::dx]
        if sub.shape[0] and sub.shape[1]:
            out += b"".join(b"\x00" + row.tobytes() for row in sub)
    return out


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


def read_text_samples(stream, n: int) -> list[str]:
    """What a consumer of a `SampleStream` does, n times: decode each sample's text and
    report it good or bad; the keys read."""
    keys = []
    for _ in range(n):
        key, files, _url = stream.next()
        try:
            files["txt"].decode("utf-8")
        except UnicodeDecodeError:
            stream.count_bad("bad_text", key)
        else:
            stream.mark_good()
        keys.append(key)
    return keys
