"""Compiled view rendering (numba): crop, resize, flip, blur, colour, descriptor in one pass.

The fast path of `mmssl.data.augment.apply_params` for batches whose images share one
size.  It computes the maths of the torch path there, which stays the reference:

- resampling: bilinear at pixel centres with border clamp (grid_sample / roi_align), the
  Gaussian blur (reflect padding, SimCLR kernel size) folded into the same separable
  weights; per view and axis only the band of source pixels that a row reads;
- colour: `mmssl.data.fastcolor` (jitter in random order, grayscale, exact HSV hue);
- the v1 descriptor of each view (`mmssl.data.augment.descriptor`), with `color_diff`
  from the channel means before and after the colour ops.

Why compiled: at 32 px a view is 3 K floats, so the ~60 torch ops of the reference path
cost mostly dispatch, and its HSV shift takes ~30 full passes; one loop nest per view
keeps the view in L1 and LLVM vectorises the pixel loops.  Compilation (~15-25 s of CPU)
is cached on disk (`cache=True`) once per environment; `mmssl.data.augment` imports this
module on first use only; `mmssl.data.fastdraws` makes the views' parameters from their
draws and renders them in one compiled call.  The kernels avoid np.argsort,
array-to-array slice assignment and global arrays: each pulls in seconds of extra
compilation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import llvmlite.ir
import numba
import numpy as np
import torch
from numba.extending import intrinsic

from mmssl.data import buffers
from mmssl.data.fastcolor import _HUE_BASIS, _JIT, _color

if TYPE_CHECKING:
    from mmssl.data.augment import ViewParams

_LIVE = 1e-10  # weights below this are dropped from a band


@intrinsic
def _u8_at(typingctx, addr):  # type: ignore[no-untyped-def]  # pragma: no cover
    """A uint8 pointer from an integer address (`numba.carray` makes it an array)."""
    if not isinstance(addr, numba.types.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], llvmlite.ir.IntType(8).as_pointer())

    return numba.types.CPointer(numba.types.uint8)(addr), codegen


@numba.njit(**_JIT)
def _band(
    start: float,
    length: float,
    src_len: int,
    size: int,
    sigma: float,
    ksize: int,
    lo: np.ndarray,
    w: np.ndarray,
    scratch: np.ndarray,
    i0: np.ndarray,
) -> int:  # pragma: no cover
    """Separable weights of one view along one axis: out[i] = sum_t w[i, t] src[lo[i] + t].

    start/length: the crop along this axis in source pixels.  Fills lo (size,) and
    w[:, :taps]; returns taps.  scratch: float64 (>= size + ksize) and i0: int64 (size)
    work space.
    Kernel taps below 1e-10 are dropped (they change no float32 value).
    """
    r = ksize // 2 if sigma > 0 else 0
    ker = scratch[: 2 * r + 1]
    fr = scratch[2 * r + 1 : 2 * r + 1 + size]
    for q in range(size):  # source pixel i0[q] and weight fr[q] of the next one
        u = min(max(start + (q + 0.5) / size * length - 0.5, 0.0), src_len - 1.0)
        f = np.floor(u)
        i0[q] = int(f)
        fr[q] = u - f
    if r == 0 and src_len > 1:  # no blur: two taps, the common case made cheap
        for i in range(size):
            j0 = i0[i]
            lo[i] = min(j0, src_len - 2)  # j0 = src_len - 1 only with a weight of 0 after it
            w[i, j0 - lo[i]] = 1.0 - fr[i]
            w[i, 1 - (j0 - lo[i])] = fr[i]
        return 2
    ker[0] = 1.0
    if r > 0:
        tot = 0.0
        for t in range(2 * r + 1):
            d = (t - r) / sigma
            ker[t] = np.exp(-0.5 * d * d)
            tot += ker[t]
        for t in range(2 * r + 1):
            ker[t] /= tot
        while r > 0 and ker[0] <= _LIVE:  # taps too small to change a float32
            ker = ker[1:-1]
            r -= 1
    # i0 is non-decreasing and reflection maps the taps of row i onto the rows
    # [max(i - r, 0), min(i + r, size - 1)], so the band of row i is known in advance
    taps = 1
    for i in range(size):
        lo[i] = i0[max(i - r, 0)]
        taps = max(taps, min(i0[min(i + r, size - 1)] + 1, src_len - 1) - lo[i] + 1)
    for i in range(size):
        lo[i] = min(lo[i], src_len - taps)
        for t in range(taps):
            w[i, t] = 0.0
    # tap by tap over all rows: consecutive updates hit different rows, where row by row
    # they chained through the same few weights (the band took 0.86 us a blurred axis at
    # 32 px, most of a blurred view's extra cost); the same sums in the same order
    for t in range(2 * r + 1):
        kt = ker[t]
        for i in range(size):
            q = abs(i + t - r)  # reflect padding of the blur
            if q > size - 1:
                q = 2 * (size - 1) - q
            j0 = i0[q] - lo[i]
            w[i, j0] += kt * (1.0 - fr[q])
            if j0 + lo[i] + 1 < src_len:
                w[i, j0 + 1] += kt * fr[q]
    return taps


@numba.njit(inline="always", **_JIT)
def _combine(
    dst: np.ndarray, src: np.ndarray, r: int, a: int, w: np.ndarray, taps: int
) -> None:  # pragma: no cover
    """dst[k] = sum_t w[t] src[r + t, a + k] for t < taps: a row of a pass with many taps.

    One sweep over dst per 4 taps: a sweep loads and stores dst once for all its taps, and
    a view blurred at 224 px has up to 24.  This resampled such a view 1.25-1.48x faster
    than one sweep per tap, with the same floats (LLVM keeps the FMA chain in tap order).
    `_resample` keeps one sweep per tap below 6 taps (no blur, small views), where this
    measured 5% slower.
    """
    n = dst.shape[0]
    b = a + n
    s0, w0 = src[r, a:b], w[0]
    for k in range(n):
        dst[k] = w0 * s0[k]
    t = 1
    while t + 4 <= taps:
        q = r + t
        s0, s1, s2, s3 = src[q, a:b], src[q + 1, a:b], src[q + 2, a:b], src[q + 3, a:b]
        w0, w1, w2, w3 = w[t], w[t + 1], w[t + 2], w[t + 3]
        for k in range(n):
            dst[k] += (w0 * s0[k] + w1 * s1[k]) + (w2 * s2[k] + w3 * s3[k])
        t += 4
    while t < taps:
        s0, w0 = src[r + t, a:b], w[t]
        for k in range(n):
            dst[k] += w0 * s0[k]
        t += 1


@numba.njit(**_JIT)
def _resample(
    src_t: np.ndarray,
    box: np.ndarray,
    flip: bool,
    sigma: float,
    ksize: int,
    out: np.ndarray,
    work: tuple[np.ndarray, ...],
) -> None:  # pragma: no cover
    """out (3, S, S) <- crop `box` (top, left, h, w) of the source, flipped and blurred.

    src_t (W, 3 H): the source transposed, src_t[x, c H + y] = src[c, y, x] / 255.
    Columns first, vectorised over the 3 H values of a source column; then one transpose
    of the rows the crop reads, so that the row pass is vectorised over output columns
    and writes `out` in place.
    """
    W = src_t.shape[0]
    H = src_t.shape[1] // 3
    S = out.shape[1]
    ylo, xlo, wy, wx, t1, t1t, scratch, i0 = work
    ty = _band(box[0], box[2], H, S, sigma, ksize, ylo, wy, scratch, i0)
    tx = _band(box[1], box[3], W, S, sigma, ksize, xlo, wx, scratch, i0)
    if flip:  # the reflect blur is symmetric, so flipping reverses the output columns
        for j in range(S // 2):
            k = S - 1 - j
            xlo[j], xlo[k] = xlo[k], xlo[j]
            for t in range(tx):
                wx[j, t], wx[k, t] = wx[k, t], wx[j, t]
    ya, yb = ylo[0], ylo[0]
    for i in range(1, S):  # ylo is monotone except where the blur reflects
        ya, yb = min(ya, ylo[i]), max(yb, ylo[i])
    ny = yb + ty - ya  # source rows [ya, ya + ny) are read
    full = H <= 64  # short row ranges vectorise badly: small sources take all 3 H values
    for j in range(S):  # t1 (S, 3 H): t1[j, c H + y]
        for span in range(1 if full else 3):
            a = 0 if full else span * H + ya
            b = 3 * H if full else a + ny
            if tx >= 6:
                _combine(t1[j, a:b], src_t, xlo[j], a, wx[j], tx)
                continue
            row, s0, w0 = t1[j, a:b], src_t[xlo[j], a:b], wx[j, 0]
            if tx == 1:  # a source one pixel wide
                for k in range(b - a):
                    row[k] = w0 * s0[k]
                continue
            # the first two taps in one sweep: at 32 px the render took 0.92x the time
            # of one sweep per tap (in-process A/B); a branch per tap count measured 1.7x
            s1, w1 = src_t[xlo[j] + 1, a:b], wx[j, 1]
            for k in range(b - a):
                row[k] = w0 * s0[k] + w1 * s1[k]
            for t in range(2, tx):  # one sweep per further tap (see `_combine`)
                st, wt = src_t[xlo[j] + t, a:b], wx[j, t]
                for k in range(b - a):
                    row[k] += wt * st[k]
    # t1t (3, ny, S), written in order (a strided read per value, no tiles): the render
    # of 32 px views measured 0.91-0.92x the time of reading in order and writing with a
    # stride (0.93x at 224 px; in-process A/B, same output), as is the source conversion
    # in `render`
    for c in range(3):
        o = c * H + ya
        for y in range(ny):
            d = t1t[c, y]
            for j in range(S):
                d[j] = t1[j, o + y]
    for c in range(3):
        for i in range(S):
            if ty >= 6:
                _combine(out[c, i], t1t[c], ylo[i] - ya, 0, wy[i], ty)
                continue
            row, s0, w0 = out[c, i], t1t[c, ylo[i] - ya], wy[i, 0]
            if ty == 1:  # a source one pixel high
                for j in range(S):
                    row[j] = w0 * s0[j]
                continue
            s1, w1 = t1t[c, ylo[i] - ya + 1], wy[i, 1]  # the first two taps in one sweep
            for j in range(S):
                row[j] = w0 * s0[j] + w1 * s1[j]
            for t in range(2, ty):
                st, wt = t1t[c, ylo[i] - ya + t], wy[i, t]
                for j in range(S):
                    row[j] += wt * st[j]


@numba.njit(**_JIT)
def _means(x: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
    """out (3,) <- channel means of x (3, S, S): float32 per row, float64 across rows."""
    for c in range(3):
        acc = 0.0
        for i in range(x.shape[1]):
            row = x[c, i]
            part = np.float32(0.0)
            for j in range(row.shape[0]):
                part += row[j]
            acc += part
        out[c] = acc / (x.shape[1] * x.shape[2])


@numba.njit(**_JIT)
def _by_source(vsrc: np.ndarray, m: int) -> np.ndarray:  # pragma: no cover
    """View indices grouped by source (a counting sort: np.argsort compiles slowly)."""
    start = np.zeros(m + 1, np.int64)
    for v in range(len(vsrc)):
        start[vsrc[v] + 1] += 1
    for k in range(m):
        start[k + 1] += start[k]
    out = np.empty(len(vsrc), np.int64)
    for v in range(len(vsrc)):
        out[start[vsrc[v]]] = v
        start[vsrc[v]] += 1
    return out


@numba.njit(**_JIT)
def render(
    addrs: np.ndarray,
    H: int,
    W: int,
    vsrc: np.ndarray,
    box: np.ndarray,
    flip: np.ndarray,
    sigma: np.ndarray,
    jitter: np.ndarray,
    factors: np.ndarray,
    order: np.ndarray,
    gray: np.ndarray,
    solarize: np.ndarray,
    hue: np.ndarray,
    solarize_t: float,
    out: np.ndarray,
    desc: np.ndarray,
) -> None:  # pragma: no cover
    """Render N views of same-size uint8 sources, see the module docstring.

    addrs (M,): the addresses of M uint8 (H, W, 3) sources, channels last as decoders
    write them (`sources`: the caller keeps them alive); vsrc (N,) the source of
    each view; box (N, 4) top, left, height, width; flip, jitter, gray, solarize (N,)
    bool; sigma (N,); factors, order (N, 4) as in ViewParams; hue: `_HUE_BASIS` for the
    YIQ hue, empty (0, 3, 3) for the exact HSV shift.  Fills out (N, 3, S, S) float32
    and desc (N, 13).
    """
    S = out.shape[2]
    M = addrs.shape[0]
    ksize = max(3, int(0.1 * S) // 2 * 2 + 1)  # as mmssl.data.torchviews._blur
    work = (
        np.empty(S, np.int64),
        np.empty(S, np.int64),
        np.empty((S, H), np.float32),
        np.empty((S, W), np.float32),
        np.empty((S, 3 * H), np.float32),
        np.empty((3, H, S), np.float32),
        np.empty(2 * S + ksize),
        np.empty(S, np.int64),
    )
    pre, post, steps = np.empty((3, 4)), np.empty((3, 4)), np.empty(4, np.bool_)
    src_t = np.empty((W, 3 * H), np.float32)
    before, after = np.empty(3), np.empty(3)
    inv = np.float32(1.0 / 255.0)
    tab = np.empty(256, np.float32)  # the byte values / 255, as float32 products
    for k in range(256):
        tab[k] = np.uint8(k) * inv
    last = -1
    for v in _by_source(vsrc, M):  # each source is converted once for all its views
        if vsrc[v] != last:
            last = vsrc[v]
            s = numba.carray(_u8_at(addrs[last]), (H, W, 3))  # type: ignore[call-arg]  # numba passes typingctx
            # written in order, read with a stride of a source row: 0.83x the time of
            # reading in order and writing with stride 3 H in tiles of 64 columns at 32 px,
            # 0.55x at 64, 0.71x at 224 (same floats); those strided writes collided in cache
            for x in range(W):
                d = src_t[x]
                for c in range(3):
                    for y in range(H):
                        d[c * H + y] = tab[s[y, x, c]]
        x = out[v]
        _resample(src_t, box[v], flip[v], sigma[v], ksize, x, work)
        _means(x, before)
        for c in range(3):
            after[c] = before[c]
        if jitter[v] or gray[v]:
            _color(
                x, order[v], factors[v], jitter[v], gray[v], hue, before, after, pre, post, steps
            )
        if solarize[v]:  # after color_diff was measured, as the torch path
            t = np.float32(solarize_t)
            for c in range(3):
                for i in range(S):
                    for j in range(S):
                        if x[c, i, j] >= t:
                            x[c, i, j] = np.float32(1.0) - x[c, i, j]
        d = desc[v]
        top, left, h, w = box[v, 0], box[v, 1], box[v, 2], box[v, 3]
        cx = (left + w / 2) / W
        d[0] = sigma[v]
        for k in range(4):
            d[1 + k] = (factors[v, k] - (1.0 if k < 3 else 0.0)) if jitter[v] else 0.0
        for c in range(3):
            d[5 + c] = after[c] - before[c]
        d[8] = (top + h / 2) / H
        d[9] = 1.0 - cx if flip[v] else cx
        d[10] = h / H
        d[11] = w / W
        d[12] = 1.0 if gray[v] else 0.0


def stack_hwc(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 (3, H, W) images of one size -> (M, H, W, 3) contiguous (RuntimeError if not).

    Decoders return (3, H, W) views of channels-last memory; stacking them into a
    channels-last buffer copies whole images instead of every third byte.
    """
    if images[0].stride(0) != 1:
        return torch.stack(images).permute(0, 2, 3, 1).contiguous()
    _, h, w = images[0].shape
    buf = buffers.empty(len(images), h, w, 3, dtype=images[0].dtype, leaves=False)
    torch.stack(images, out=buf.permute(0, 3, 1, 2))
    return buf


class Sources(NamedTuple):
    """M uint8 (H, W, 3) images in memory, for `render`."""

    addrs: np.ndarray  # (M,) int64: where each image starts
    height: int
    width: int
    owner: Any  # what holds the memory: the images, or their stack


def sources(images: list[torch.Tensor]) -> Sources | None:
    """uint8 (3, H, W) RGB images of one size as `render`'s sources, None if they are not.

    Decoders return (3, H, W) views of channels-last memory: those are read where they
    are (their addresses), which saved the copy into one (M, H, W, 3) batch (0.87 us per
    32 px image; checking the strides costs 0.36).  Others are stacked (`stack_hwc`).
    Only CPU memory has an address numba may read: any other device gives None.
    """
    first = images[0]
    if first.dim() != 3 or first.shape[0] != 3 or first.dtype != torch.uint8:
        return None
    if not all(im.is_cpu for im in images):  # a GPU (or meta) address would crash the read
        return None
    _, h, w = first.shape
    want = (first.shape, (1, 3 * w, 3), torch.uint8)
    if all((im.shape, im.stride(), im.dtype) == want for im in images):
        addrs = np.array([im.data_ptr() for im in images], dtype=np.int64)
        return Sources(addrs, int(h), int(w), images)
    try:
        src = stack_hwc(images)
    except RuntimeError:  # mixed sizes
        return None
    if src.dtype != torch.uint8 or tuple(src.shape[1:]) != (h, w, 3):
        return None
    step = int(h) * int(w) * 3
    addrs = src.data_ptr() + step * np.arange(len(images), dtype=np.int64)
    return Sources(addrs, int(h), int(w), src)


def render_views(
    src: Sources, vsrc: np.ndarray, p: ViewParams, size: int, hue_mode: str, solarize_t: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (N, 3, size, size) in [0, 1] and their v1 descriptors (N, 13), as the torch path.

    src: the source images (`sources`); view i is drawn from image vsrc[i] with the
    parameters in row i of `p`.
    """
    n = len(vsrc)
    if n and not 0 <= int(vsrc.min()) <= int(vsrc.max()) < len(src.addrs):
        raise IndexError(f"view sources {vsrc} outside the {len(src.addrs)} images")
    out = buffers.empty(n, 3, size, size)  # huge pages, or shared in a worker: mmssl.data.buffers
    desc = torch.empty(n, 13)
    c = np.ascontiguousarray
    render(
        src.addrs,
        src.height,
        src.width,
        c(vsrc, np.int64),
        c(p.box, np.int64),
        c(p.flip, np.bool_),
        c(p.sigma, np.float64),
        c(p.jitter, np.bool_),
        c(p.factors, np.float64),
        c(p.order, np.int64),
        c(p.gray, np.bool_),
        c(p.solarize, np.bool_),
        _HUE_BASIS if hue_mode == "yiq" else _NO_HUE,
        float(solarize_t),
        out.numpy(),
        desc.numpy(),
    )
    return out, desc


_NO_HUE = np.empty((0, 3, 3))
