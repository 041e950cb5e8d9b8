"""mmssl.data.fastpng against libpng (torchvision's decoder): the same bytes for every PNG it
covers (8-bit grey, grey + alpha, RGB, RGBA, not interlaced), each row filter type, image data
split over several IDAT chunks or followed by extra bytes; other PNGs are left to libpng."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
import torch
from data_helpers import png_chunk, png_with_data
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as libpng

from mmssl.data.decode import _png_chunks, decode_image

fastpng = pytest.importorskip("mmssl.data.fastpng")  # numba: the `fast` extra, installed by make

BPP = {0: 1, 2: 3, 4: 2, 6: 4}
RNG = np.random.default_rng(0)


def _reference(data: bytes) -> torch.Tensor:
    return libpng(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _filtered(w: int, h: int, colour: int, filters: list[int]) -> bytes:
    """Random bytes as the filtered rows of an image, row y with filters[y % len]: unfiltering
    them exercises each filter's arithmetic, wrap-around included."""
    raw = RNG.integers(0, 256, (h, w * BPP[colour]), dtype=np.uint8)
    return b"".join(bytes([filters[y % len(filters)]]) + raw[y].tobytes() for y in range(h))


@pytest.mark.parametrize("colour", sorted(BPP))
@pytest.mark.parametrize("filters", [[0], [1], [2], [3], [4], [4, 3, 2, 1, 0]])
@pytest.mark.parametrize("size", [(1, 1), (3, 4), (17, 9)])
def test_every_filter_type_unfilters_as_libpng(colour, filters, size):
    data = png_with_data(*size, zlib.compress(_filtered(*size, colour, filters)), colour=colour)
    got = fastpng.decode(*_png_chunks(data))
    assert got is not None and torch.equal(got, _reference(data))
    assert got.stride() == (1, 3 * size[0], 3)  # channels-last, as the renderer reads it


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_pngs_pil_writes_decode_as_libpng(mode):
    arr = RNG.integers(0, 256, (23, 31, 4), dtype=np.uint8)
    im = Image.fromarray(arr, "RGBA").convert(mode)
    for options in ({}, {"optimize": True}, {"compress_level": 0}):
        buf = io.BytesIO()
        im.save(buf, "PNG", **options)
        assert fastpng.decode(*_png_chunks(buf.getvalue())) is not None
        assert torch.equal(decode_image(buf.getvalue()), _reference(buf.getvalue()))


def test_image_data_over_several_idat_chunks_and_with_extra_bytes():
    rows = _filtered(20, 20, 2, [4, 1])
    z = zlib.compress(rows)
    head = png_with_data(20, 20, b"")
    cut = head.index(b"IDAT") - 4
    split = head[:cut] + b"".join(
        png_chunk(b"IDAT", z[a:b]) for a, b in [(0, 9), (9, 50), (50, None)]
    )
    split += png_chunk(b"IEND", b"")
    longer = png_with_data(20, 20, zlib.compress(rows + b"\0" * 99))  # libpng warns, decodes
    for data in (split, longer):
        assert torch.equal(fastpng.decode(*_png_chunks(data)), _reference(data))


@pytest.mark.parametrize("mode", ["P", "1", "I;16"])
def test_other_pngs_are_left_to_libpng(mode):
    arr = RNG.integers(0, 256, (9, 7), dtype=np.uint8)
    im = Image.fromarray(arr.astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(arr)
    buf = io.BytesIO()
    (im if mode == "I;16" else im.convert(mode)).save(buf, "PNG")
    assert fastpng.decode(*_png_chunks(buf.getvalue())) is None
    assert decode_image(buf.getvalue()).shape == (3, 9, 7)
    interlaced = png_with_data(3, 3, zlib.compress(b"\0" * 40), interlace=1)
    assert fastpng.decode(*_png_chunks(interlaced)) is None


@pytest.mark.parametrize("byte", [10, 11])  # compression method, filter method: 0 only
def test_a_header_method_other_than_0_is_left_to_libpng(byte):
    """libpng refuses a filter method other than 0 (and PIL too): the fast path decoded it."""
    from data_helpers import png_chunk

    data = bytearray(png_with_data(5, 4, zlib.compress(_filtered(5, 4, 2, [0]))))
    data[16 + byte] = 1  # IHDR's data starts at byte 16
    ihdr = bytes(data[16:29])
    data = data[:8] + png_chunk(b"IHDR", ihdr) + data[33:]
    assert fastpng.decode(*_png_chunks(bytes(data))) is None


def test_numba_with_nowhere_to_cache_its_kernels_falls_back_to_libpng(monkeypatch):
    """numba raises RuntimeError at import when no cache location is writable (a read-only
    install without a cache directory): the compiled modules are then None and decoding
    goes through the check and libpng, instead of every decode raising."""
    import sys

    import numba.core.caching as caching

    from mmssl.data import decode

    def no_locator(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot cache function 'x': no locator available for file 'y'")

    data = png_with_data(5, 4, zlib.compress(_filtered(5, 4, 2, [1, 4])))
    want = _reference(data)
    monkeypatch.setattr(caching.CacheImpl, "__init__", no_locator)
    monkeypatch.delitem(sys.modules, "mmssl.data.fastpng")
    decode._load_compiled.cache_clear()
    try:
        assert decode.compiled("fastpng") is None
        assert torch.equal(decode_image(data), want)
    finally:
        decode._load_compiled.cache_clear()
