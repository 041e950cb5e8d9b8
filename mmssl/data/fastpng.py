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

from mmssl.data.decode import BadSample

_SAMPLES = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> bytes per pixel at 8 bits


@numba.njit(cache=True, nogil=True)
def _unfilter(
    raw: np.ndarray, height: int, stride: int, bpp: int, out: np.ndarray
) -> int:  # pragma: no cover
    """out (height, stride) <- the rows of `raw` (each a filter type byte, then `stride`
    filtered bytes) unfiltered (PNG spec, section 9); returns -1, or the first filter type
    above 4 (damage)."""
    for y in range(height):
        f = raw[y * (stride + 1)]
        if f > 4:
            return f
        src = raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]
        row = out[y]
        up = out[y - 1] if y > 0 else np.zeros(stride, np.uint8)
        for x in range(stride):
            a = np.int32(row[x - bpp]) if x >= bpp else np.int32(0)
            b = np.int32(up[x])
            v = np.int32(src[x])
            if f == 1:
                v += a
            elif f == 2:
                v += b
            elif f == 3:
                v += (a + b) >> 1
            elif f == 4:
                c = np.int32(up[x - bpp]) if x >= bpp else np.int32(0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                v += a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            row[x] = v & 255
    return -1


def decode(ihdr: bytes, idat: bytes) -> torch.Tensor | None:
    """uint8 (3, H, W) RGB of a PNG with header `ihdr` and image data `idat` (its IDAT
    chunks joined), as a view of (H, W, 3) memory as torchvision returns it; None for a
    format this does not cover; BadSample for image data that libpng would die on."""
    if len(ihdr) != 13 or ihdr[8] != 8 or ihdr[9] not in _SAMPLES or ihdr[12] != 0:
        return None
    w, h = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    if not w or not h:  # libpng refuses the header itself
        return None
    bpp = _SAMPLES[ihdr[9]]
    need = h * (1 + w * bpp)
    z = zlib.decompressobj()
    try:
        raw = z.decompress(idat, need)  # bytes past the rows are let be, as libpng does
    except zlib.error as err:
        raise BadSample("bad_image", f"PNG image data does not inflate ({err})") from None
    if len(raw) < need:
        what = "is cut short" if not z.eof else f"inflates to {len(raw)} bytes"
        raise BadSample("bad_image", f"PNG image data {what}, its rows take {need}")
    if not z.eof:  # the rows are all there: the rest of the stream must still be whole
        try:
            while z.decompress(z.unconsumed_tail, 1 << 20):
                pass
        except zlib.error as err:
            raise BadSample("bad_image", f"PNG image data does not inflate ({err})") from None
        if not z.eof:
            raise BadSample("bad_image", "PNG image data cut short (its stream does not end)")
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
