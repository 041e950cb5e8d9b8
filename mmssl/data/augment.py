"""SimCLR/CASSLE views with their v1 augmentation descriptors, batched for speed.

Per view: RandomResizedCrop -> horizontal flip -> Gaussian blur -> colour jitter
(brightness, contrast, saturation, hue in random order, with probability `jitter_p`) ->
grayscale -> solarize (optional).  Parameters are drawn per view from a numpy Generator,
so a seeded generator gives identical views.  SimCLR blurs after the colour ops; blurring
first lets the blur ride along with the resampling for free.  Blur is linear with unit gain,
and brightness, contrast, saturation, grayscale and the YIQ hue are per-pixel affine maps,
so with those both orders give the same view except where a colour op clips at 0 or 1.  The
exact HSV hue shift (`hue_mode="hsv"`, the default) is not affine: at an edge between two
colours, blur-then-shift is another view than SimCLR's shift-then-blur (measured: up to 0.28
per pixel, 25% of pixels off by more than 0.02, on 64 px images of random colour blocks at
hue 0.1; at most 0.001 on the tinted demo digits).  The descriptor describes the view drawn.

Descriptor (v1, `mmssl.descriptor.DESCRIPTOR_V1`, 13 dims):
- blur: sigma in output pixels, 0 when not blurred;
- color: brightness - 1, contrast - 1, saturation - 1, hue shift (fraction of the colour
  circle, in [-0.5, 0.5]); all 0 when colour jitter was not applied;
- color_diff: measured per-channel (R, G, B) mean of the view after the colour ops
  (jitter and grayscale) minus before them, in [0, 1] intensity units;
- crop: centre y, centre x, height, width as fractions of the source image; centre x is
  mirrored (1 - cx) when the view was flipped;
- grayscale: 1 or 0.
Solarize has no slot in v1 (nor in CASSLE's descriptor): a solarized view's descriptor
equals the unsolarized one's, and color_diff is measured before it.  A recipe whose model
or AugSelf reads descriptors is refused a `solarize_p` above 0 (`train.objective_checks`).
The neutral descriptor (no augmentation) is `DESCRIPTOR_V1.neutral`:
blur 0, color 0 0 0 0, color_diff 0 0 0, crop 0.5 0.5 1 1, grayscale 0.

Speed: a batch of one source size goes to the compiled renderer `mmssl.data.fastviews`
(numba; crop, resize, flip, blur, colour and descriptor of a view in one loop nest) when
numba is installed; `AugmentConfig.backend` picks it ("numba"), this module's torch
path ("torch") or the first that applies ("auto").  The torch path is the reference:
crop + resize + flip + blur in `mmssl.data.torchviews`, then the colour ops: the jitter
and grayscale of a view fold into a single 3x4 colour matrix (contrast uses the
analytically propagated mean), applied to all views with one `baddbmm` and clamped once.  torchvision
clamps after every op instead; the results agree whenever no intermediate value leaves
[0, 1].  `hue_mode="hsv"` (default) shifts hue exactly in HSV like torchvision;
`hue_mode="yiq"` folds hue into the colour matrix as a YIQ chroma rotation (as NVIDIA
DALI does), which is faster and approximate.

The crop box is resampled as a continuous region, as torchvision's `roi_align` does:
bilinear at the centres of the output pixels, clamped at the image's border only.  Where a
box is enlarged, its edge rows and columns blend in up to half of the source pixel beyond
the box, where torchvision's `resized_crop` clamps at the box (the other pixels of such a
view agree).  A box larger than the view is shrunk without antialiasing in a batch whose
images share one size of at most 1.5x the view (the batched path), and antialiased, as
`resized_crop` does, in any other batch (one resize per view): a view of a 40 px box at
32 px differs between the two by up to 0.2 on noise, 0.03 on a smooth image (values in
[0, 1]).  The descriptor's crop is the box either way.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmssl.data.colorops import apply_color
from mmssl.data.decode import compiled, compiled_problem
from mmssl.data.torchviews import _crop_resize
from mmssl.descriptor import PIPELINE_LAYOUT, get_layout


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths and probabilities of the view pipeline (BYOL/CASSLE defaults)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1  # up to 0.5: a shift of up to +-180 degrees
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    hue_mode: str = "hsv"
    backend: str = "auto"  # "auto" | "numba" | "torch": who renders (same views)

    def __post_init__(self) -> None:
        # every field checked here, naming it: a bad value would otherwise pass a recipe's
        # validation and crash the workers later (numpy's "high - low < 0", an IndexError)
        if self.backend not in ("auto", "numba", "torch"):
            raise ValueError(f"backend must be 'auto', 'numba' or 'torch', got {self.backend!r}")
        if self.hue_mode not in ("hsv", "yiq"):
            raise ValueError(f"hue_mode must be 'hsv' or 'yiq', got {self.hue_mode!r}")
        for name in ("scale", "ratio", "blur_sigma"):
            pair = getattr(self, name)
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(map(is_real, pair))):
                raise ValueError(f"{name} must be 2 numbers [min, max], got {pair!r}")
            if not pair[0] <= pair[1]:
                raise ValueError(f"{name} must have min <= max, got {list(pair)}")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {list(self.scale)}")
        if not 0.0 < self.ratio[0] <= self.ratio[1] < math.inf:  # log(ratio) is drawn
            raise ValueError(f"ratio must be positive and finite, got {list(self.ratio)}")
        if not 0.0 <= self.blur_sigma[0] <= self.blur_sigma[1] < math.inf:
            raise ValueError(f"blur_sigma must be >= 0 and finite, got {list(self.blur_sigma)}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            value = getattr(self, name)
            if not (is_real(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not (is_real(value) and 0.0 <= value < math.inf):
                raise ValueError(f"{name} strength must be >= 0 and finite, got {value!r}")
        if not (is_real(self.hue) and 0.0 <= self.hue <= 0.5):  # 0.5: +-180 degrees
            raise ValueError(f"hue strength must be in [0, 0.5], got {self.hue!r}")
        # intensities are in [0, 1]
        if not (is_real(self.solarize_threshold) and 0.0 <= self.solarize_threshold <= 1.0):
            raise ValueError(
                f"solarize_threshold must be in [0, 1], got {self.solarize_threshold!r}"
            )


def is_real(value: Any) -> bool:
    """A real number (not a bool, a string or None)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class ViewParams:
    """Parameters of B views (one per image): arrays with leading dim B."""

    box: np.ndarray  # (B, 4) int: top, left, height, width in source pixels
    flip: np.ndarray  # (B,) bool
    jitter: np.ndarray  # (B,) bool
    factors: np.ndarray  # (B, 4) brightness, contrast, saturation factors and hue shift
    order: np.ndarray  # (B, 4) permutation of the 4 jitter ops
    gray: np.ndarray  # (B,) bool
    sigma: np.ndarray  # (B,) blur sigma, 0 = no blur
    solarize: np.ndarray  # (B,) bool

    @staticmethod
    def identity(sizes: list[tuple[int, int]]) -> ViewParams:
        """Parameters that leave each image as it is: the whole (H, W) of `sizes`, no flip, jitter,
        grey, blur or solarize."""
        b = len(sizes)
        return ViewParams(
            box=np.array([[0, 0, h, w] for h, w in sizes], dtype=np.int64).reshape(b, 4),
            flip=np.zeros(b, bool),
            jitter=np.zeros(b, bool),
            factors=np.tile([1.0, 1.0, 1.0, 0.0], (b, 1)),
            order=np.tile(np.arange(4), (b, 1)),
            gray=np.zeros(b, bool),
            sigma=np.zeros(b),
            solarize=np.zeros(b, bool),
        )


def _crop_boxes(
    hw: np.ndarray, scale: np.ndarray, aspect: np.ndarray, u: np.ndarray, r0: float, r1: float
) -> np.ndarray:
    """RandomResizedCrop boxes (B, 4) top, left, height, width from the draws of
    `sample_params`: hw (B, 2) source sizes, scale/aspect (B, T) per try, u (B, T, 2)
    positions; the first try that fits, else a centre crop at the clamped aspect ratio."""
    b = len(hw)
    target = (hw[:, 0] * hw[:, 1])[:, None] * scale
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= hw[:, 1:2]) & (h <= hw[:, 0:1])
    hit = ok.any(axis=1)
    t = ok.argmax(axis=1)  # first successful try
    rows = np.arange(b)
    H, W = hw[:, 0], hw[:, 1]
    ch, cw = h[rows, t], w[rows, t]
    r = W / H
    # at least 1 px: a 1 px thick image with a ratio range far from 1 rounded to 0 (torchvision
    # too), and the view was an interpolation to size 0 or a point with a crop width of 0
    fw = np.where(r < r0, W, np.where(r > r1, np.maximum(np.round(H * r1), 1), W))
    fh = np.where(r < r0, np.maximum(np.round(W / r0), 1), H)
    ch, cw = np.where(hit, ch, fh), np.where(hit, cw, fw)
    top = np.where(hit, np.floor(u[rows, t, 0] * (H - ch + 1)), (H - ch) // 2)
    left = np.where(hit, np.floor(u[rows, t, 1] * (W - cw + 1)), (W - cw) // 2)
    return np.stack([top, left, ch, cw], axis=1).astype(np.int64)


# the uniform draws of one view, all from one `rng.random((B, VIEW_DRAWS))` call: a batch's
# parameters cost one generator call and one compiled pass instead of ~13 calls and ~30 numpy
# ops (1.1 us per sample of two views at batch 64, most of it fixed per-call cost)
_SCALE, _ASPECT, _POS = slice(0, 10), slice(10, 20), slice(20, 40)  # RandomResizedCrop tries
_JITTER, _FACTORS, _ORDER = 40, slice(41, 45), slice(45, 49)
_GRAY, _BLUR, _SIGMA, _SOLARIZE, _FLIP = 49, 50, 51, 52, 53
VIEW_DRAWS = 54


def param_constants(cfg: AugmentConfig) -> np.ndarray:
    """The config as the float64 vector that `fastdraws.view_params` reads: scale (2),
    ratio (2), jitter_p, factor lows (4), factor highs (4), grayscale_p, blur_p,
    blur_sigma (2), solarize_p, flip_p."""
    lo = lambda s: max(0.0, 1.0 - s)  # noqa: E731
    return np.array(
        [
            *cfg.scale,
            *cfg.ratio,
            cfg.jitter_p,
            lo(cfg.brightness),
            lo(cfg.contrast),
            lo(cfg.saturation),
            -cfg.hue,
            1 + cfg.brightness,
            1 + cfg.contrast,
            1 + cfg.saturation,
            cfg.hue,
            cfg.grayscale_p,
            cfg.blur_p,
            *cfg.blur_sigma,
            cfg.solarize_p,
            cfg.flip_p,
        ],
        dtype=np.float64,
    )


def _params_numpy(hw: np.ndarray, u: np.ndarray, aspect: np.ndarray, k: np.ndarray) -> tuple:
    """`fastdraws.view_params` in numpy (no numba): the same floats, the same parameters."""
    b = len(hw)
    scale = k[0] + (k[1] - k[0]) * u[:, _SCALE]
    box = _crop_boxes(hw, scale, aspect, u[:, _POS].reshape(b, 10, 2), k[2], k[3])
    jitter = u[:, _JITTER] < k[4]
    factors = k[5:9] + (k[9:13] - k[5:9]) * u[:, _FACTORS]
    factors[~jitter] = (1.0, 1.0, 1.0, 0.0)
    order = np.argsort(u[:, _ORDER], axis=1, kind="stable")
    gray = u[:, _GRAY] < k[13]
    sigma = np.where(u[:, _BLUR] < k[14], k[15] + (k[16] - k[15]) * u[:, _SIGMA], 0.0)
    return box, u[:, _FLIP] < k[18], jitter, factors, order, gray, sigma, u[:, _SOLARIZE] < k[17]


def _draws(rng: np.random.Generator, n: int, cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """The uniform draws of n views (n, VIEW_DRAWS) and their crop aspect ratios (n, 10)."""
    u = rng.random((n, VIEW_DRAWS))
    logr = np.log(cfg.ratio)
    # numpy's exp for both paths: numba's may differ in the last bit and flip a rounding
    return u, np.exp(logr[0] + (logr[1] - logr[0]) * u[:, _ASPECT])


def sample_params(
    rng: np.random.Generator, sizes: list[tuple[int, int]] | np.ndarray, cfg: AugmentConfig
) -> ViewParams:
    """Draw one view's parameters for each source size (H, W) (list or (B, 2) array),
    torchvision semantics: RandomResizedCrop (10 tries, then a centre crop at the clamped
    aspect ratio), flip, jitter factors in a random order, grayscale, blur sigma, solarize.
    All from one `rng.random((B, VIEW_DRAWS))` draw, whoever renders."""
    b = len(sizes)
    hw = np.array(sizes, dtype=np.float64).reshape(b, 2)
    u, aspect = _draws(rng, b, cfg)
    k = param_constants(cfg)
    fast = _fast_draws() if cfg.backend != "torch" else None
    params = (fast.view_params if fast else _params_numpy)(hw, u, aspect, k)
    return ViewParams(*params)


def _fast_module() -> Any:
    """`mmssl.data.fastviews`, or None (`decode.compiled`)."""
    return compiled("fastviews")


def _fast_draws() -> Any:
    """`mmssl.data.fastdraws`, or None (`decode.compiled`)."""
    return compiled("fastdraws")


def check_images(images: list[Tensor]) -> None:
    """TypeError/ValueError unless every image is a uint8 (3, H, W) tensor.

    The renderers read 0..255: a float image in [0, 1] (torchvision's `to_tensor`) would
    render nearly black views without a word, an (H, W, 3) one fail deep in a reshape."""
    for i, im in enumerate(images):
        if not isinstance(im, Tensor) or im.dtype != torch.uint8:
            what = im.dtype if isinstance(im, Tensor) else type(im).__name__
            raise TypeError(
                f"image {i} is {what}: views are drawn from uint8 (3, H, W) tensors (0..255); "
                "convert a float image in [0, 1] with (x * 255).round().to(torch.uint8)"
            )
        if im.ndim != 3 or im.shape[0] != 3 or min(im.shape[1:]) < 1:
            raise ValueError(f"image {i} has shape {tuple(im.shape)}: views need (3, H, W), RGB")


def check_size(size: Any) -> None:
    """ValueError unless the view size is an integer >= 2: the blur reflects at the view's
    border, which a 1-pixel view does not have."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 2:
        raise ValueError(f"view size must be an integer >= 2, got {size!r}")


def _stack_for_fast(images: list[Tensor], size: int, backend: str) -> Any:
    """The images as `fastviews.Sources` when the compiled renderer applies, else None."""
    if backend not in ("auto", "torch", "numba"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'numba', got {backend!r}")
    if backend == "torch" or not images:
        return None
    fast = _fast_module()
    if fast is None:
        if backend == "numba":
            raise ImportError(f"backend='numba', but {compiled_problem('fastviews')}")
        return None
    src = fast.sources(images)
    # mixed sizes and big downscales: the torch path resamples per view, antialiased
    if src is None or max(src.height, src.width) > 1.5 * size:
        if backend == "numba":
            raise ValueError(
                "backend='numba' needs uint8 (3, H, W) images of one size, at most 1.5x the view size"
            )
        return None
    return src


def apply_params(
    images: list[Tensor],
    p: ViewParams,
    size: int,
    hue_mode: str = "hsv",
    solarize_t: float = 0.5,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Render views and descriptors: images uint8 (3, H, W) each -> (B, 3, size, size), (B, 13).

    backend: "torch" (the reference), "numba" (`mmssl.data.fastviews`, compiled; needs
    numba and images of one size) or "auto" (numba where it applies, else torch).
    """
    check_size(size)
    first: dict[int, int] = {}  # an image passed once per view is read once
    vsrc = np.array([first.setdefault(id(im), len(first)) for im in images], dtype=np.int64)
    src = _stack_for_fast(list({id(im): im for im in images}.values()), size, backend)
    if src is not None:
        return _fast_module().render_views(src, vsrc, p, size, hue_mode, solarize_t)
    check_images(images)  # the compiled path took only uint8 (3, H, W): these may be anything
    x = _crop_resize(images, p, size)
    before = x.mean(dim=(2, 3))
    x = apply_color(x, p, hue_mode)
    diff = x.mean(dim=(2, 3)) - before  # (B, 3)
    if p.solarize.any():
        idx = torch.from_numpy(np.flatnonzero(p.solarize))
        y = x[idx]
        x[idx] = torch.where(y >= solarize_t, 1.0 - y, y)
    sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
    return x, descriptor(p, sizes, diff)


def descriptor(p: ViewParams, sizes: list[tuple[int, int]], color_diff: Tensor) -> Tensor:
    """The v1 descriptors (B, 13) of views drawn with `p` from sources of `sizes`."""
    hw = np.array(sizes, dtype=np.float64).reshape(-1, 2)
    box = p.box.astype(np.float64)
    cy = (box[:, 0] + box[:, 2] / 2) / hw[:, 0]
    cx = (box[:, 1] + box[:, 3] / 2) / hw[:, 1]
    cx = np.where(p.flip, 1.0 - cx, cx)
    color = np.where(p.jitter[:, None], p.factors - np.array([1.0, 1.0, 1.0, 0.0]), 0.0)
    out = np.concatenate(
        [
            p.sigma[:, None],
            color,
            np.zeros((len(cy), 3)),
            np.stack([cy, cx, box[:, 2] / hw[:, 0], box[:, 3] / hw[:, 1]], axis=1),
            p.gray[:, None].astype(np.float64),
        ],
        axis=1,
    )
    t = torch.from_numpy(out).float()
    t[:, 5:8] = color_diff.float()
    return t


def make_views(
    images: list[Tensor],
    num_views: int,
    size: int,
    cfg: AugmentConfig | Sequence[AugmentConfig],
    rng: np.random.Generator,
) -> tuple[list[Tensor], list[Tensor]]:
    """`num_views` augmented views of a batch: lists of (B, 3, size, size) and (B, 13).

    All views of the batch are rendered in one pass (V * B rows) to share op overheads.
    `cfg` may be a sequence of one config per view (BYOL-style asymmetric views); each
    view is then rendered in its own pass.
    """
    check_size(size)
    if num_views < 1:
        return [], []
    if not isinstance(cfg, AugmentConfig) and len(cfg) != num_views:
        raise ValueError(f"{len(cfg)} augment configs for {num_views} views")
    if not images:  # a batch of none, as the models take one
        width = get_layout(PIPELINE_LAYOUT).dim
        return [torch.zeros(0, 3, size, size) for _ in range(num_views)], [
            torch.zeros(0, width) for _ in range(num_views)
        ]
    if not isinstance(cfg, AugmentConfig):
        per_view = [make_views(images, 1, size, c, rng) for c in cfg]
        return [v[0][0] for v in per_view], [v[1][0] for v in per_view]
    b = len(images)
    src = _stack_for_fast(images, size, cfg.backend)
    if src is not None:  # the parameters of sample_params, made and used in compiled code
        u, aspect = _draws(rng, b * num_views, cfg)
        x, d = _fast_draws().render_draws(
            src, u, aspect, param_constants(cfg), size, cfg.hue_mode, cfg.solarize_threshold
        )
    else:
        check_images(images)
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        p = sample_params(rng, sizes * num_views, cfg)
        x, d = apply_params(
            images * num_views, p, size, cfg.hue_mode, cfg.solarize_threshold, backend="torch"
        )
    return [x[k * b : (k + 1) * b] for k in range(num_views)], [
        d[k * b : (k + 1) * b] for k in range(num_views)
    ]
