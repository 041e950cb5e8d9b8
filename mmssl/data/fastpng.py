"""Decoding the common PNGs without libpng: 8-bit grey, grey + alpha, RGB and RGBA, not
interlaced (numba).

`mmssl.data.decode` inflates a PNG's image data before torchvision sees it, because libpng
kills the process on damaged rows (`png_damage`).  Inflating is most of a PNG decode, so for
these formats the rows it gave are unfiltered here instead of inflated a second time by
libpng: the same bytes as torchvision's decode (tested against it), alpha dropped and grey
repeated into three channels as its `ImageReadMode.RGB` does, no gamma applied, as it
applies none.  Other PNGs (palette, 1/2/4/16-bit, interlaced) go to torchvision after the
check.  About 2x faster than check + torchvision at 32 and at 224 px.
"""

from __future__ import annotations

import zlib

import numba
import numpy as np
import torch

from mmssl.data.decode import BadSample, inflate

_SAMPLES = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> bytes per pixel at 8 bits


@numba.njit(cache=True, nogil=True)
def _unfilter(
    raw: np.ndarray, height: int, stride: int, bpp: int, out: np.ndarray
) -> int:  # pragma: no cover
    """out (height, stride) <- the rows of `raw` (each a filter type byte, then `stride`
    filtered bytes) unfiltered (PNG spec, section 9); returns -1, or the first filter type
    above 4 (damage).  One loop per filter type, the first pixel's bytes apart (they have
    no left neighbour): None and Up vectorise, Sub, Average and Paeth run byte by byte, as
    their definition chains them; uint8 sums wrap modulo 256 as the spec's do."""
    zero = np.zeros(stride, np.uint8)
    for y in range(height):
        f = raw[y * (stride + 1)]
        src = raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]
        row = out[y]
        up = out[y - 1] if y > 0 else zero
        if f == 0:
            row[:] = src
        elif f == 1:
            row[:bpp] = src[:bpp]
            for x in range(bpp, stride):
                row[x] = src[x] + row[x - bpp]
        elif f == 2:
            for x in range(stride):
                row[x] = src[x] + up[x]
        elif f == 3:
            for x in range(bpp):
                row[x] = src[x] + (up[x] >> 1)
            for x in range(bpp, stride):
                row[x] = src[x] + np.uint8((np.int32(row[x - bpp]) + np.int32(up[x])) >> 1)
        elif f == 4:
            for x in range(bpp):  # no left: a = c = 0, so Paeth picks the byte above
                row[x] = src[x] + up[x]
            for x in range(bpp, stride):
                a, b, c = np.int32(row[x - bpp]), np.int32(up[x]), np.int32(up[x - bpp])
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                row[x] = src[x] + np.uint8(a if pa <= pb and pa <= pc else (b if pb <= pc else c))
        else:
            return f
    return -1


def decode(ihdr: bytes, idat: list[memoryview]) -> torch.Tensor | None:
    """uint8 (3, H, W) RGB of a PNG with header `ihdr` and image data `idat` (its IDAT
    chunks), as a view of (H, W, 3) memory as torchvision returns it; None for a format
    this does not cover; BadSample for image data that libpng would die on."""
    if len(ihdr) != 13 or ihdr[8] != 8 or ihdr[9] not in _SAMPLES or ihdr[10:13] != b"\0\0\0":
        return None  # compression, filter method and interlace other than 0: libpng decides
    w, h = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    if not w or not h:  # libpng refuses the header itself
        return None
    bpp = _SAMPLES[ihdr[9]]
    need = h * (1 + w * bpp)
    raw = bytearray()
    z = zlib.decompressobj()
    try:
        for piece in inflate(z, idat):  # bytes past the rows are let be, as libpng does
            raw += piece[: need - len(raw)]
    except zlib.error as err:
        raise BadSample("bad_image", f"PNG image data does not inflate ({err})") from None
    if not z.eof:
        raise BadSample("bad_image", "PNG image data cut short (its stream does not end)")
    if len(raw) < need:
        raise BadSample(
            "bad_image", f"PNG image data inflates to {len(raw)} bytes, its rows take {need}"
        )
    out = np.empty((h, w * bpp), np.uint8)
    bad = _unfilter(np.frombuffer(raw, np.uint8), h, w * bpp, bpp, out)
    if bad >= 0:
        raise BadSample("bad_image", f"PNG row filter type {bad} (0-4 exist)")
    px = out.reshape(h, w, bpp)
    if bpp == 3:
        rgb = px
    elif bpp == 4:
        rgb = px[:, :, :3].copy()  # new memory: strides (3 W, 3, 1) even for 1 px
    else:  # grey (+ alpha): the grey repeated into R, G and B
        rgb = np.repeat(px[:, :, :1], 3, axis=2)
    return torch.from_numpy(rgb).permute(2, 0, 1)
