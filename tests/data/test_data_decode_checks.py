"""Decoder checks no other test pins: the pixel limit on the PIL path (formats without a
PNG/JPEG header size: bmp, gif, webp, tiff), an empty or blank caption as a bad sample, and
the compiled PNG path refusing a stream short of its rows or of its zlib checksum."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mmssl.data.decode import BadSample, decode_image, decode_text


def test_pixel_limit_applies_to_formats_decoded_by_pil() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(buf, format="BMP")
    assert decode_image(buf.getvalue(), max_pixels=600).shape == (3, 20, 30)
    with pytest.raises(BadSample) as err:
        decode_image(buf.getvalue(), max_pixels=599)
    assert err.value.kind == "image_too_large"


@pytest.mark.parametrize("text", [b"", b"   \n", b"\xef\xbb\xbf  "])
def test_an_empty_caption_is_a_bad_sample(text: bytes) -> None:
    with pytest.raises(BadSample) as err:
        decode_text({"txt": text})
    assert err.value.kind == "missing_caption"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_a_png_one_byte_short_of_its_rows_is_bad() -> None:
    w, h = 4, 3
    rows = b"".join(b"\x00" + bytes(range(3 * w)) for _ in range(h))  # filter 0, RGB
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    good = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )
    assert decode_image(good).shape == (3, h, w)
    short = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(rows[:-1]))
        + _chunk(b"IEND", b"")
    )
    with pytest.raises(BadSample) as err:
        decode_image(short)
    assert err.value.kind == "bad_image"


def test_a_png_whose_deflate_stream_is_cut_before_its_checksum_is_bad() -> None:
    """F2: every row inflates but the zlib stream lacks its Adler-32 tail (z.eof False):
    libpng fails it (`png_damage` says so), so the fast path must too."""
    from mmssl.data.decode import png_damage

    w, h = 4, 3
    rows = b"".join(b"\x00" + bytes(range(3 * w)) for _ in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    cut = zlib.compress(rows)[:-4]
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", cut) + _chunk(b"IEND", b"")
    assert png_damage(png) is not None
    with pytest.raises(BadSample) as err:
        decode_image(png)
    assert err.value.kind == "bad_image"


def test_an_image_of_exactly_max_pixels_decodes() -> None:
    """The limit is inclusive, as PIL's fallback path has it: 40 x 25 = 1000 pixels."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((25, 40, 3), np.uint8)).save(buf, "PNG")
    assert decode_image(buf.getvalue(), max_pixels=1000).shape == (3, 25, 40)
    with pytest.raises(BadSample):
        decode_image(buf.getvalue(), max_pixels=999)
