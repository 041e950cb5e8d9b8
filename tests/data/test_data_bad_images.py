"""Damaged and hostile image files: a PNG whose image data would crash libpng, chunks out of
order or failing their CRC, a JPEG or GIF/BMP header claiming more pixels than the limit, a
16-bit PNG, an image in a format not decoded: each is found before the decoder, counted as
the right kind of bad sample, and never kills the process."""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import numpy as np
import pytest
import torch
from bad_input_helpers import _good
from data_helpers import adam7_rows, png_bytes, png_flipped, png_with_data

from mmssl.data.shards import ShardWriter


def test_16_bit_png_keeps_its_range():
    # torchvision decodes it to uint16 and PIL's RGB conversion clips it to white
    import io

    from PIL import Image

    from mmssl.data.decode import decode_image

    ramp = np.linspace(0, 65535, 400).astype(np.uint16).reshape(20, 20)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    img = decode_image(buf.getvalue())
    assert img.dtype == torch.uint8 and img.shape == (3, 20, 20)
    assert torch.equal(img[0], torch.from_numpy((ramp >> 8).astype(np.uint8)))


def test_a_png_damaged_in_its_image_data_is_a_counted_bad_image_not_a_crash(tmp_path):
    """torchvision's PNG decoder dies with SIGSEGV on an IDAT that fails its CRC, and on
    image data that does not inflate to its rows under correct CRCs: both are checked
    first.  Run in a child process, so that a regression fails this test instead of
    killing the test session.  (An epoch's batches,
    counted with the damaged samples, are full: the stream reads on past its end to fill
    them, hence the set.)"""
    import subprocess
    import sys

    arr = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    w = ShardWriter(str(tmp_path), "s", max_count=20)
    for i in range(8):
        w.write(_good(i))
    for where in ("crc", "data"):
        w.write({"__key__": f"b{where}", "png": png_flipped(arr, where), "txt": "damaged"})
    for i, kind in enumerate(sorted(_CRASHERS)):  # every CRC correct
        png = png_with_data(5, 6, _CRASHERS[kind][0])
        w.write({"__key__": f"c{i}", "png": png, "txt": "damaged"})
    w.write({"__key__": "split", "png": _split_idat(), "txt": "damaged"})
    w.close()
    code = (
        "import itertools, json, sys\n"
        "from mmssl.data.pipeline import build_pipeline\n"
        f"pl = build_pipeline({str(tmp_path / 's-000000.tar')!r}, batch_size=2, mode='epoch',"
        " rank=0, world_size=1, image_size=6, num_views=1, shuffle=1)\n"
        "keys = sorted({k for b in pl for k in b['__key__']})\n"
        "print(json.dumps([keys, pl.skipped]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    keys, skipped = json.loads(done.stdout.splitlines()[-1])
    assert keys == [f"g{i:04d}" for i in range(8)]
    assert skipped == {"bad_image": 3 + len(_CRASHERS)}


def test_png_damage_names_the_chunk_and_passes_whole_files():
    from mmssl.data.decode import BadSample, decode_image, png_damage

    arr = np.arange(6 * 6 * 3, dtype=np.uint8).reshape(6, 6, 3)
    good = png_bytes(arr)
    assert png_damage(good) is None and png_damage(good + b"trailing bytes") is None
    assert torch.equal(decode_image(good), torch.from_numpy(arr).permute(2, 0, 1))
    assert png_damage(png_flipped(arr, "crc")) == "chunk b'IDAT' fails its CRC"
    assert png_damage(good[:-2]) == "chunk b'IEND' cut short"
    assert png_damage(good[:-6]).startswith("cut inside a chunk header")
    with pytest.raises(BadSample) as err:
        decode_image(png_flipped(arr, "data"))
    assert err.value.kind == "bad_image" and "IDAT" in str(err.value)


def _rows(arr: np.ndarray, filter_type: int = 0) -> bytes:
    """The inflated image data of an 8-bit (H, W, 3) image, one filter type on every row."""
    return b"".join(bytes([filter_type]) + row.tobytes() for row in arr)


_ARR = np.random.default_rng(3).integers(0, 256, (6, 5, 3), dtype=np.uint8)
_ROWS = _rows(_ARR)
_EXPECT = torch.from_numpy(_ARR).permute(2, 0, 1)
_Z = zlib.compress(_ROWS)
# image data under correct CRCs that made torchvision's decoder (libpng) die with SIGSEGV
_CRASHERS = {
    "broken deflate": (_Z[:2] + bytes(b ^ 0x5A for b in _Z[2:12]) + _Z[12:], "does not inflate"),
    "wrong Adler-32": (_Z[:-4] + b"\0\0\0\0", "incorrect data check"),
    "deflate cut short": (_Z[:-6], "cut short"),
    "no image data": (b"", "cut short"),
    "too few rows": (zlib.compress(_ROWS[: len(_ROWS) // 2]), "its rows take 96"),
    "filter type 7": (zlib.compress(_rows(_ARR, 7)), "row filter type 7"),
}


@pytest.mark.parametrize("fast", [True, False], ids=["numba", "libpng"])
@pytest.mark.parametrize("kind", sorted(_CRASHERS))
def test_png_damage_finds_image_data_that_libpng_would_die_on(kind, fast, monkeypatch):
    """Both decoders refuse it: mmssl.data.fastpng (numba), and the check before torchvision
    without numba (or for a format fastpng does not cover)."""
    from mmssl.data import decode
    from mmssl.data.decode import BadSample, decode_image, png_damage

    if not fast:
        monkeypatch.setattr(decode, "_fast_png", lambda: None)
    idat, words = _CRASHERS[kind]
    data = png_with_data(5, 6, idat)
    assert words in png_damage(data)
    with pytest.raises(BadSample) as err:
        decode_image(data)
    assert err.value.kind == "bad_image"


def test_png_image_data_check_passes_what_libpng_decodes():
    """Bytes after the rows (libpng warns and decodes), Adam7 interlacing (its empty passes
    have no rows), a filter type on each row: whole files, decoded as the array."""
    from mmssl.data.decode import decode_image, png_damage

    expect = torch.from_numpy(_ARR).permute(2, 0, 1)
    for data in (
        png_with_data(5, 6, zlib.compress(_ROWS + b"\0" * 40)),
        png_with_data(5, 6, zlib.compress(adam7_rows(_ARR)), interlace=1),
        png_bytes(_ARR),  # PIL's encoder picks its filters
    ):
        assert png_damage(data) is None
        assert torch.equal(decode_image(data), expect)
    tiny = np.full((1, 1, 3), 7, np.uint8)  # 6 of Adam7's 7 passes are empty
    assert png_damage(png_with_data(1, 1, zlib.compress(adam7_rows(tiny)), interlace=1)) is None
    short = zlib.compress(adam7_rows(_ARR)[:-3])
    assert "its rows take" in png_damage(png_with_data(5, 6, short, interlace=1))


def test_png_image_data_is_inflated_in_steps(monkeypatch):
    """A big image is inflated a piece at a time (memory stays bounded); a bad filter byte
    in a later piece is still found."""
    from mmssl.data import decode

    monkeypatch.setattr(decode, "_INFLATE_STEP", 7)
    monkeypatch.setattr(decode, "_FEED", 5)  # and fed a few compressed bytes at a time
    assert decode.png_damage(png_with_data(5, 6, _Z)) is None
    assert torch.equal(decode.decode_image(png_with_data(5, 6, _Z)), _EXPECT)
    bad = bytearray(_ROWS)
    bad[5 * 16] = 9  # the filter byte of row 5 (rows are 16 bytes)
    found = decode.png_damage(png_with_data(5, 6, zlib.compress(bytes(bad))))
    assert found == "row filter type 9 (0-4 exist)"


def _split_idat() -> bytes:
    """_ROWS as a PNG whose image data is two IDAT chunks with a text chunk between them."""
    from data_helpers import png_chunk

    whole = png_with_data(5, 6, b"")
    head = whole[: whole.index(b"IDAT") - 4]
    parts = [png_chunk(b"IDAT", _Z[:20]), png_chunk(b"tEXt", b"a\0b"), png_chunk(b"IDAT", _Z[20:])]
    return head + b"".join(parts) + png_chunk(b"IEND", b"")


@pytest.mark.parametrize("fast", [True, False], ids=["numba", "libpng"])
def test_idat_chunks_split_by_another_chunk_are_damage(fast, monkeypatch):
    """libpng stops reading image data at the first other chunk and then dies for want of
    rows (SIGSEGV in torchvision); the spec wants IDAT chunks consecutive."""
    from mmssl.data import decode

    if not fast:
        monkeypatch.setattr(decode, "_fast_png", lambda: None)
    assert (
        decode.png_damage(_split_idat()) == "IDAT chunks are not consecutive (b'tEXt' between them)"
    )
    with pytest.raises(decode.BadSample, match="not consecutive"):
        decode.decode_image(_split_idat())


def test_png_damage_walks_over_ancillary_chunks_and_the_size_limit_comes_first():
    """libpng decodes a PNG whose text chunk fails its CRC (it drops the chunk); a damaged
    image over the pixel limit is image_too_large, found from its header alone."""
    import io

    from PIL import Image, PngImagePlugin

    from mmssl.data.decode import BadSample, decode_image, png_damage

    arr = np.arange(6 * 6 * 3, dtype=np.uint8).reshape(6, 6, 3)
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "hello")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", pnginfo=info)
    data = bytearray(buf.getvalue())
    pos = data.index(b"tEXt") - 4
    n = int.from_bytes(data[pos : pos + 4], "big")
    data[pos + 8 + n] ^= 1  # the text chunk's CRC
    assert png_damage(bytes(data)) is None
    assert torch.equal(decode_image(bytes(data)), torch.from_numpy(arr).permute(2, 0, 1))
    with pytest.raises(BadSample) as err:
        decode_image(png_flipped(arr, "crc"), max_pixels=35)
    assert err.value.kind == "image_too_large"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_a_png_whose_first_chunk_is_not_ihdr_cannot_pass_the_size_limit():
    """The size was read from bytes 16..24 whatever chunk held them: a text chunk before IHDR
    saying 1 x 1 let a 200 x 200 image decode under max_pixels 1000 (libpng refuses a chunk
    before IHDR; PIL decodes it)."""
    from mmssl.data.decode import BadSample, decode_image

    w = h = 200
    z = zlib.compress((b"\0" + bytes(3 * w)) * h, 9)
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    rest = ihdr + _chunk(b"IDAT", z) + _chunk(b"IEND", b"")
    sig = b"\x89PNG\r\n\x1a\n"
    with pytest.raises(BadSample) as err:
        decode_image(sig + rest, max_pixels=1000)
    assert err.value.kind == "image_too_large"
    decoy = _chunk(b"tEXt", struct.pack(">II", 1, 1) + b"x\0y")
    with pytest.raises(BadSample) as err:
        decode_image(sig + decoy + rest, max_pixels=1000)
    assert err.value.kind == "bad_image" and "first chunk" in str(err.value)
    assert decode_image(sig + rest).shape == (3, h, w)


def _jpeg(size: tuple[int, int], **save: Any) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "JPEG", **save)
    return buf.getvalue()


def test_the_jpeg_size_is_the_frame_libjpeg_decodes():
    """A TEM marker (FF 01, no length) was given a length: the walk jumped into a comment
    holding a fake 16 x 16 frame header while libjpeg decoded the real 2000 x 2000 one, past
    max_pixels.  The walk now reads markers as libjpeg does."""
    from mmssl.data.decode import BadSample, _jpeg_size, decode_image

    src = _jpeg((16, 16), quality=90)
    segments, i = [], 2
    while src[i + 1] != 0xDA:  # up to the scan
        n = int.from_bytes(src[i + 2 : i + 4], "big")
        segments.append(src[i : i + 2 + n])
        i += 2 + n
    sof = next(s for s in segments if s[1] == 0xC0)
    real = sof[:5] + struct.pack(">HH", 2000, 2000) + sof[9:]
    out = bytearray(b"\xff\xd8\xff\x01") + real
    fake = b"\xff\xc0\x00\x11\x08" + struct.pack(">HH", 16, 16) + b"\x03" + bytes(9)
    pad = 2 + 2 + 0xFFC0 - (len(out) + 4)  # where a length read at the TEM marker lands
    payload = bytes(pad) + fake + bytes(16)
    out += b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload
    out += b"".join(s for s in segments if s[1] != 0xC0) + src[i:]
    assert _jpeg_size(bytes(out)) == (2000, 2000)
    with pytest.raises(BadSample) as err:
        decode_image(bytes(out), max_pixels=1000)
    assert err.value.kind == "image_too_large"
    # the sizes of ordinary files, as PIL reads them: baseline, progressive, with EXIF
    for save in ({}, {"progressive": True}, {"exif": b"Exif\0\0" + bytes(64)}):
        assert _jpeg_size(_jpeg((37, 23), **save)) == (23, 37), save


def test_a_bomb_in_a_format_pil_decodes_is_counted_as_too_large() -> None:
    """A GIF or BMP header claiming 20000 x 20000 pixels hit PIL's own limit at open and was
    counted as bad_image, where the same PNG or JPEG header is image_too_large."""
    import io

    from PIL import Image

    from mmssl.data.decode import BadSample, decode_image

    for fmt, at, pack in (("GIF", 6, "<HH"), ("BMP", 18, "<ii")):
        buf = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buf, fmt)
        data = bytearray(buf.getvalue())
        data[at : at + struct.calcsize(pack)] = struct.pack(pack, 20000, 20000)
        with pytest.raises(BadSample) as err:
            decode_image(bytes(data))
        assert err.value.kind == "image_too_large", (fmt, err.value)


def test_a_sample_with_an_image_in_another_format_names_its_members() -> None:
    """A `.avif` member was reported as a bare missing_image, the file never named."""
    from mmssl.data.decode import BadSample, find_image

    with pytest.raises(BadSample) as err:
        find_image({"__key__": "k", "avif": b"...", "txt": b"a cat"})
    assert err.value.kind == "missing_image"
    assert err.value.detail.endswith("member; it has: avif, txt")
