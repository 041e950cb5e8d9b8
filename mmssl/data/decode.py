"""Decoding one sample's files: image (with a pixel limit), caption, json fields.

Every failure is a `BadSample(kind)`, which the pipeline counts and skips.
"""

from __future__ import annotations

import functools
import io
import json
import math
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

# pgm/pbm/pnm (Netpbm, as ppm) decode through PIL, as every format but png and jpg does
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif", "pgm", "pbm", "pnm")
TEXT_EXTS = ("txt", "text", "caption")
DEFAULT_MAX_PIXELS = 50_000_000  # ~7000 x 7000; bigger declared sizes are decompression bombs


class BadSample(Exception):
    """A sample that cannot be used; `kind` names the counter it goes to."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(detail or kind)
        self.kind = kind
        self.detail = detail


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(H, W) of a PNG's IHDR, None for other bytes.  BadSample unless IHDR is the first
    chunk, as the spec wants: the size check read bytes 16..24 whatever chunk held them, so a
    small chunk before IHDR let an image of any size past `max_pixels` (libpng refuses it)."""
    if data[:8] != PNG_SIGNATURE:
        return None
    if len(data) < 33 or data[12:16] != b"IHDR" or data[8:12] != b"\0\0\0\x0d":
        raise BadSample("bad_image", "PNG whose first chunk is not a 13-byte IHDR")
    return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")


_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
# Adam7 passes: first column, first row, column step, row step
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)
_INFLATE_STEP = 1 << 20  # inflated bytes per step: memory stays bounded for a big image
# compressed bytes per step: the decompressor copies its unconsumed input at every step, so
# a whole big IDAT fed at once made inflating quadratic in its size
_FEED = 1 << 16


def png_damage(data: bytes) -> str | None:
    """What is wrong with a PNG (a chunk cut short, a critical chunk whose CRC-32 does not
    match, image data that does not inflate to its rows), or None when it is whole, or
    `data` is no PNG.

    torchvision's PNG decoder (0.29) kills the process with SIGSEGV when libpng meets an
    error while reading the rows, where errors in the header raise: an IDAT that fails its
    CRC, a deflate stream that is broken, cut short or fails its Adler-32, too few bytes
    for the rows, a row filter type above 4.  So the chunks are walked first (critical
    ones CRC-checked; libpng drops an ancillary chunk whose CRC fails, with a warning) and
    the image data is inflated and its rows checked (`_image_data_damage`).  Inflating is
    most of a PNG decode, so `decode_image` unfilters the rows it inflated itself for the
    common formats (`mmssl.data.fastpng`, with numba: as fast as torchvision unchecked);
    other PNGs pay this check before torchvision, about 1.5x (32 px) to 1.8x (224 px) its
    decode alone.
    """
    if not data.startswith(PNG_SIGNATURE):
        return None
    try:
        _png_size(data)  # the header decode_image reads first: IHDR the first chunk
    except BadSample as bad:
        return bad.detail.removeprefix("PNG ")
    chunks = _png_chunks(data)
    return chunks if isinstance(chunks, str) else _image_data_damage(*chunks)


def _png_chunks(data: bytes) -> tuple[bytes, list[memoryview]] | str:
    """A PNG's header (IHDR's data) and image data (its IDAT chunks), or what is wrong with
    its chunks: one cut short, a critical one whose CRC-32 does not match, IDAT chunks with
    another between them (the spec wants them consecutive; libpng stops at the gap and dies
    for want of rows)."""
    view = memoryview(data)
    pos, end = len(PNG_SIGNATURE), len(data)
    ihdr, last = b"", b""
    idat: list[memoryview] = []
    while pos < end:
        if pos + 8 > end:
            return f"cut inside a chunk header at byte {pos}"
        n = int.from_bytes(data[pos : pos + 4], "big")
        kind = bytes(data[pos + 4 : pos + 8])
        if pos + 12 + n > end:
            return f"chunk {kind!r} cut short"
        critical = not kind[0] & 0x20  # bit 5 of the type's first byte: ancillary
        if critical and zlib.crc32(view[pos + 4 : pos + 8 + n]) != int.from_bytes(
            data[pos + 8 + n : pos + 12 + n], "big"
        ):
            return f"chunk {kind!r} fails its CRC"
        if kind == b"IHDR" and not ihdr:
            ihdr = bytes(data[pos + 8 : pos + 8 + n])
        elif kind == b"IDAT":
            if idat and last != b"IDAT":
                return f"IDAT chunks are not consecutive ({last!r} between them)"
            idat.append(view[pos + 8 : pos + 8 + n])
        elif kind == b"IEND":
            break
        pos, last = pos + 12 + n, kind
    # no IEND: libpng reads the rows without it, so they are checked all the same
    return ihdr, idat


def inflate(z: Any, idat: list[memoryview]) -> Iterator[bytes]:
    """The image data inflated by decompressor `z`, in pieces of at most _INFLATE_STEP
    bytes, the IDAT data fed _FEED bytes at a time; zlib.error for a broken stream (the
    caller reads `z.eof` afterwards: False when the stream was cut short)."""
    for part in idat:
        for start in range(0, len(part), _FEED):
            rest = part[start : start + _FEED]
            while rest:
                piece = z.decompress(rest, _INFLATE_STEP)
                rest = z.unconsumed_tail
                yield piece
    while piece := z.decompress(b"", _INFLATE_STEP):  # output still held back
        yield piece


def _row_runs(ihdr: bytes) -> list[tuple[int, int]]:
    """(bytes per row with its filter byte, rows) of each pass of the image data; [] for
    a header libpng refuses itself (it raises for those)."""
    if len(ihdr) != 13 or ihdr[9] not in _CHANNELS:
        return []
    w, h = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    bits = _CHANNELS[ihdr[9]] * ihdr[8]
    runs = []
    for x0, y0, dx, dy in _ADAM7 if ihdr[12] == 1 else ((0, 0, 1, 1),):
        pw, ph = -(-(w - x0) // dx), -(-(h - y0) // dy)
        if pw > 0 and ph > 0:  # an empty pass has no rows, not even filter bytes
            runs.append((1 + (pw * bits + 7) // 8, ph))
    return runs


def _image_data_damage(ihdr: bytes, idat: list[memoryview]) -> str | None:
    """What libpng would meet while reading the rows: a deflate stream that is broken, cut
    short or fails its Adler-32, fewer bytes than the rows take, a filter type above 4.
    Bytes after the rows pass, as libpng lets them (with a warning)."""
    runs = _row_runs(ihdr)
    if not runs:
        return None
    need = sum(length * rows for length, rows in runs)
    z = zlib.decompressobj()
    run, left = 0, runs[0][1]  # the pass being read, its rows not yet reached
    row = 0  # offset of the next row's filter byte in the inflated stream
    done = 0  # bytes inflated before `piece`
    try:
        for piece in inflate(z, idat):
            while run < len(runs) and row < done + len(piece):  # the filter bytes in piece
                length = runs[run][0]
                stop = min(done + len(piece), row + left * length)
                filters = piece[row - done : stop - done : length]
                if max(filters) > 4:
                    return f"row filter type {max(filters)} (0-4 exist)"
                row, left = row + len(filters) * length, left - len(filters)
                if left == 0:
                    run += 1
                    left = runs[run][1] if run < len(runs) else 0
            done += len(piece)
    except zlib.error as err:
        return f"image data does not inflate ({err})"
    if not z.eof:
        return "image data cut short (its deflate stream does not end)"
    if done < need:
        return f"image data inflates to {done} bytes, its rows take {need}"
    return None


_JPEG_NO_LENGTH = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RST0..7: a marker alone
_JPEG_SOF = frozenset(m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC))


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(H, W) of a JPEG's frame header, found as libjpeg (torchvision's decoder) finds it,
    None when there is none before the scan (PIL decides then, checking its size first).

    The markers are read as libjpeg's `next_marker` reads them: bytes up to an 0xFF are
    skipped, 0xFF fill bytes too, FF 00 is no marker; TEM and RST have no length.  A walker
    that gave TEM a length jumped into a comment holding a small fake frame header, and
    the size check passed an image of any size."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while True:
        while True:  # the next marker
            i = data.find(b"\xff", i)
            if i < 0:
                return None
            while i + 1 < n and data[i + 1] == 0xFF:
                i += 1
            if i + 1 >= n:
                return None
            if data[i + 1] != 0:
                break
            i += 2
        marker = data[i + 1]
        i += 2
        if marker in _JPEG_SOF:
            if i + 7 > n:
                return None
            return int.from_bytes(data[i + 3 : i + 5], "big"), int.from_bytes(
                data[i + 5 : i + 7], "big"
            )
        if marker in _JPEG_NO_LENGTH:
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # SOI again, EOI, or a scan before any frame
            return None
        if i + 2 > n:
            return None
        i += max(int.from_bytes(data[i : i + 2], "big"), 2)


def compiled(name: str) -> Any:
    """Numba module `mmssl.data.<name>` (fastviews, fastdraws, fastpng), imported on first
    use, not at import; None when it cannot run (`compiled_problem`): the callers fall back
    to torch or libpng.  An installed numba that cannot run is a warning, once a module and
    process (this runs per decoded image); a missing one is the optional `fast` extra, and
    says nothing."""
    module, why, installed = _load_compiled(name)
    if module is None and installed and name not in _SAID:
        _SAID.add(name)
        warnings.warn(f"mmssl.data.{name} cannot run: {why}; a slower path runs", stacklevel=2)
    return module


_SAID: set[str] = set()  # the modules `compiled` warned of


def compiled_problem(name: str) -> str | None:
    """Why `compiled(name)` is None, as a sentence with its fix; None when it loads."""
    return _load_compiled(name)[1]


@functools.cache  # once a process: a failed import searches sys.path again each time
def _load_compiled(name: str) -> tuple[Any, str | None, bool]:
    """(module, None, True), or (None, why, whether numba is installed): numba missing;
    nowhere to cache its compiled kernels (numba raises RuntimeError at import then: a
    read-only install without a writable cache folder); or numba's debug switch
    NUMBA_DISABLE_JIT, which runs the kernels as Python, ~1000x slower, and fastviews'
    byte-reading intrinsic not at all."""
    import importlib

    try:
        module = importlib.import_module(f"mmssl.data.{name}")
        jit_off = importlib.import_module("numba").config.DISABLE_JIT
    except ImportError as err:
        why = f"numba cannot be imported ({err}); install the `fast` extra (pip install numba)"
        return None, why, False
    except RuntimeError as err:
        why = (
            f"numba cannot cache the compiled kernels ({err}); set NUMBA_CACHE_DIR to a "
            "writable folder"
        )
        return None, why, True
    if jit_off:
        return None, "NUMBA_DISABLE_JIT is set, so numba compiles nothing; unset it", True
    return module, None, True


def _fast_png() -> Any:
    return compiled("fastpng")


_QUIET = False


def _quiet_torchvision() -> None:
    """torchvision 0.29 warns on every decode that TorchCodec will replace it; say it once."""
    global _QUIET
    if not _QUIET:
        import warnings

        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io")
        _QUIET = True


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Tensor:
    """Encoded bytes -> uint8 (3, H, W) RGB; BadSample on damage or too many pixels."""
    png = _png_size(data)
    size = png or _jpeg_size(data)
    if size is not None:
        if size[0] * size[1] > max_pixels:
            raise BadSample("image_too_large", f"{size[1]}x{size[0]} > {max_pixels} pixels")
        if png:
            chunks = _png_chunks(data)
            if isinstance(chunks, str):
                raise BadSample("bad_image", f"PNG {chunks}")
            fast = _fast_png()
            img = fast.decode(*chunks) if fast is not None else None
            if img is not None:
                return img
            damage = _image_data_damage(*chunks)
            if damage:
                raise BadSample("bad_image", f"PNG {damage}")
        try:
            _quiet_torchvision()
            from torchvision.io import ImageReadMode
            from torchvision.io import decode_image as tv_decode

            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            img = tv_decode(buf, mode=ImageReadMode.RGB)
            if img.dtype == torch.uint16:  # 16-bit PNG: keep the top 8 bits (PIL would clip)
                img = (img.to(torch.int32) >> 8).to(torch.uint8)
            if img.dtype == torch.uint8 and tuple(img.shape[1:]) == size:
                return img
        except (RuntimeError, ValueError):
            pass  # PIL below decides whether the bytes are really bad
    import numpy as np
    from PIL import Image

    from mmssl.data.shard_inputs import to_rgb8  # 16-bit and float greyscale as above

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size[0] * im.size[1] > max_pixels:
                raise BadSample("image_too_large", f"{im.size} > {max_pixels} pixels")
            arr = np.asarray(to_rgb8(im))
    except BadSample:
        raise
    except Image.DecompressionBombError as err:  # PIL's own limit (~179 MP), checked at open
        raise BadSample("image_too_large", str(err)) from None
    except Exception as err:  # PIL raises many types for damaged data
        raise BadSample("bad_image", f"{type(err).__name__}: {err}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def find_image(files: dict[str, bytes]) -> bytes:
    """The bytes of a sample's image member, the first of IMAGE_EXTS it has; BadSample
    "missing_image" when it has none."""
    for ext in IMAGE_EXTS:
        if ext in files:
            return files[ext]
    # the members it has instead: an image in a format mmssl does not read (.avif) shows
    members = ", ".join(sorted(k for k in files if not k.startswith("__"))) or "none"
    raise BadSample("missing_image", f"no {'/'.join(IMAGE_EXTS)} member; it has: {members}")


def decode_text(files: dict[str, bytes], kind: str = "missing_caption") -> str:
    """The caption / document text (utf-8, a byte-order mark dropped); BadSample if missing, empty or undecodable."""
    for ext in TEXT_EXTS:
        if ext in files:
            try:
                text = files[ext].decode("utf-8-sig").strip()
            except UnicodeDecodeError as err:
                raise BadSample("bad_text", str(err)) from None
            if not text:
                raise BadSample(kind, "empty text")
            return text
    raise BadSample(kind)


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def field_column(values: list[Any], floats: torch.dtype = torch.float32) -> Tensor:
    """One json field of a batch (B,): bool when every value is one, int64 when every value
    is a whole number in int64's range (JSON `3` and `3.0` alike, so every batch of a label
    field agrees), else `floats`.

    `torch.tensor` made a field written as `16777217.0`, or a batch mixing ints and floats,
    float32, which rounds a class id above 2**24 onto its neighbour."""
    if all(isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.bool)
    if all(
        isinstance(v, int) or (float(v).is_integer() and -(2.0**63) <= v < 2.0**63) for v in values
    ):
        return torch.tensor([int(v) for v in values], dtype=torch.int64)
    return torch.tensor([float(v) for v in values], dtype=floats)


def decode_fields(files: dict[str, bytes], fields: tuple[str, ...]) -> dict[str, Any]:
    """Requested json fields (`label` also from a `.cls` file); BadSample if absent."""
    if not fields:
        return {}
    meta: dict[str, Any] = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"].decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadSample("bad_json", str(err)) from None
        if not isinstance(meta, dict):
            raise BadSample("bad_json", "not an object")
    out: dict[str, Any] = {}
    for name in fields:
        if name in meta:
            out[name] = meta[name]
        elif name == "label" and "cls" in files:
            try:
                out[name] = int(files["cls"].decode("ascii").strip())
            except (UnicodeDecodeError, ValueError) as err:
                raise BadSample("bad_json", f"cls: {err}") from None
        else:
            raise BadSample("missing_field", name)
        if not isinstance(out[name], (int, float, bool)):
            raise BadSample("bad_json", f"field {name!r} is not a number")
        if isinstance(out[name], int) and not -(2**63) <= out[name] < 2**63:
            raise BadSample("bad_json", f"field {name!r} does not fit in int64")
        # Python's json reads NaN and Infinity (not JSON) and 1e400 as inf: a label that
        # equals nothing, not even itself
        if isinstance(out[name], float) and not math.isfinite(out[name]):
            raise BadSample("bad_json", f"field {name!r} is {out[name]}")
        # a finite number past float32's largest became inf in a training batch's column
        if isinstance(out[name], float) and abs(out[name]) > _FLOAT32_MAX:
            raise BadSample("bad_json", f"field {name!r} = {out[name]} is beyond float32")
    return out
