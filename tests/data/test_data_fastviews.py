"""The compiled view renderer (numba) against the torch reference path of mmssl.data.augment.

Every view, descriptor and crop box of the fast path must equal the reference up to float32
rounding (the reference's grid_sample, used above 64 px, rounds its sample coordinates to
float32, hence the looser tolerance there).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("numba", reason="the compiled view renderer needs numba")

from mmssl.data import fastdraws, fastviews  # noqa: E402
from mmssl.data.augment import (  # noqa: E402
    VIEW_DRAWS,
    AugmentConfig,
    _crop_boxes,
    _params_numpy,
    apply_params,
    make_views,
    param_constants,
    sample_params,
)

# everything on, strong hue, solarize at 0.5 (where it is continuous)
ALL_ON = dict(jitter_p=0.9, grayscale_p=0.3, blur_p=0.5, hue=0.5, solarize_p=0.3, flip_p=0.5)


def _images(n: int, h: int, w: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for _ in range(n)]


@pytest.mark.parametrize("hue_mode", ["hsv", "yiq"])
@pytest.mark.parametrize(
    "src_hw, size",
    [((32, 32), 32), ((20, 28), 20), ((12, 12), 24), ((70, 70), 72), ((1, 5), 4)],
)
def test_views_and_descriptors_match_reference(hue_mode, src_hw, size):
    imgs = _images(6, *src_hw)
    cfg = AugmentConfig(hue_mode=hue_mode, **ALL_ON)
    p = sample_params(np.random.default_rng(7), [src_hw] * 12, cfg)
    ref_v, ref_d = apply_params(imgs * 2, p, size, hue_mode, backend="torch")
    v, d = apply_params(imgs * 2, p, size, hue_mode, backend="numba")
    tol = 5e-5 if size > 64 else 2e-6
    assert torch.allclose(v, ref_v, atol=tol, rtol=0), (v - ref_v).abs().max()
    assert torch.allclose(d, ref_d, atol=1e-6, rtol=0), (d - ref_d).abs().max()
    # the cases exercise every op: colour, hue, grayscale, blur, flip, solarize
    assert p.jitter.any() and p.gray.any() and (p.sigma > 0).any() and p.flip.any()
    assert p.solarize.any() and (p.factors[:, 3] != 0).any()


def test_make_views_equals_torch_backend_and_reads_channels_last_sources():
    """make_views passes each image once for all its views; decoders hand out (3, H, W)
    views of channels-last memory, which are stacked whole."""
    hwc = [im.permute(1, 2, 0).contiguous() for im in _images(8, 32, 32, seed=3)]
    decoded = [x.permute(2, 0, 1) for x in hwc]  # strides of torchvision's decode_image
    assert decoded[0].stride(0) == 1
    cfg = AugmentConfig(**ALL_ON)
    views_t, desc_t = make_views(
        decoded, 2, 32, AugmentConfig(backend="torch", **ALL_ON), np.random.default_rng(1)
    )
    views_n, desc_n = make_views(decoded, 2, 32, cfg, np.random.default_rng(1))
    for a, b in zip(views_t + desc_t, views_n + desc_n):
        assert torch.allclose(a, b, atol=2e-6, rtol=0)
    assert torch.equal(fastviews.stack_hwc(decoded), torch.stack(hwc))


def test_crop_boxes_match_numpy_including_fallback():
    rng = np.random.default_rng(0)
    fell_back = 0
    for _ in range(200):
        b = 32
        hw = rng.integers(1, 200, (b, 2)).astype(np.float64)
        lo = rng.uniform(0.01, 1.0)
        r0 = rng.uniform(0.2, 1.0)
        r1 = rng.uniform(r0, 5.0)
        scale = rng.uniform(lo, 1.0, (b, 10))
        aspect = np.exp(rng.uniform(np.log(r0), np.log(r1), (b, 10)))
        u = rng.random((b, 10, 2))
        ref = _crop_boxes(hw, scale, aspect, u, r0, r1)
        assert np.array_equal(fastdraws.crop_boxes(hw, scale, aspect, u, r0, r1), ref)
        w = np.round(np.sqrt(hw[:, :1] * hw[:, 1:] * scale * aspect))
        h = np.round(np.sqrt(hw[:, :1] * hw[:, 1:] * scale / aspect))
        fits = (w > 0) & (h > 0) & (w <= hw[:, 1:]) & (h <= hw[:, :1])
        fell_back += int((~fits.any(axis=1)).sum())
    assert fell_back > 0  # the centre-crop fallback was compared too


def test_numba_backend_refuses_what_it_does_not_render():
    p = sample_params(np.random.default_rng(0), [(20, 20), (20, 22)], AugmentConfig())
    with pytest.raises(ValueError, match="images of one size"):
        apply_params(_images(1, 20, 20) + _images(1, 20, 22), p, 16, backend="numba")
    # a big downscale is antialiased by the torch path; the compiled one does not
    p = sample_params(np.random.default_rng(0), [(64, 64)], AugmentConfig())
    with pytest.raises(ValueError, match="1.5x"):
        apply_params(_images(1, 64, 64), p, 16, backend="numba")
    views, _ = apply_params(_images(1, 64, 64), p, 16, backend="auto")  # falls back
    assert views.shape == (1, 3, 16, 16)


def test_view_params_match_numpy_fallback():
    """The compiled parameter pass and its numpy fallback give the same parameters from the
    same draws (ties in the jitter order's keys included), so both backends draw alike."""
    rng = np.random.default_rng(0)
    cfgs = [
        AugmentConfig(),
        AugmentConfig(scale=(0.01, 1.0), ratio=(0.2, 5.0), brightness=2.0, **ALL_ON),
    ]
    for cfg in cfgs:
        k = param_constants(cfg)
        logr = np.log(cfg.ratio)
        for _ in range(50):
            b = 40
            hw = rng.integers(1, 200, (b, 2)).astype(np.float64)
            u = rng.random((b, VIEW_DRAWS))
            u[:3, 45:49] = 0.5
            aspect = np.exp(logr[0] + (logr[1] - logr[0]) * u[:, 10:20])
            for a, f in zip(
                _params_numpy(hw, u, aspect, k), fastdraws.view_params(hw, u, aspect, k)
            ):
                assert a.dtype == f.dtype and np.array_equal(a, f)
    p = sample_params(np.random.default_rng(3), [(32, 32)] * 64, AugmentConfig(**ALL_ON))
    assert sorted(map(tuple, p.order)) != [(0, 1, 2, 3)] * 64
    assert all(sorted(o) == [0, 1, 2, 3] for o in p.order.tolist())
    q = sample_params(
        np.random.default_rng(3), [(32, 32)] * 64, AugmentConfig(backend="torch", **ALL_ON)
    )
    assert all(np.array_equal(a, b) for a, b in zip(vars(p).values(), vars(q).values()))


def test_sources_read_decoded_images_in_place_and_stack_others():
    hwc = [im.permute(1, 2, 0).contiguous() for im in _images(4, 12, 10, seed=5)]
    decoded = [x.permute(2, 0, 1) for x in hwc]  # views of channels-last memory
    src = fastviews.sources(decoded)
    assert src.owner is decoded and (src.height, src.width) == (12, 10)
    assert src.addrs.tolist() == [x.data_ptr() for x in hwc]
    planar = _images(4, 12, 10, seed=5)  # contiguous (3, H, W): stacked channels-last
    stacked = fastviews.sources(planar)
    assert torch.equal(stacked.owner, torch.stack(hwc))
    assert fastviews.sources(planar[:1] + _images(1, 12, 11)) is None  # mixed sizes
    assert fastviews.sources([x.float() for x in planar]) is None
    cfg = AugmentConfig(**ALL_ON)
    a = make_views(decoded, 2, 12, cfg, np.random.default_rng(2))
    b = make_views(planar, 2, 12, cfg, np.random.default_rng(2))
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))


def test_sources_refuse_memory_off_the_cpu():
    """Only CPU memory has an address numba may read: a channels-last image elsewhere (here
    on the meta device, as one moved to a GPU would be) is not read in place (that crashed
    the process), nor stacked; the caller falls back to the torch path."""
    meta = torch.empty(12, 10, 3, dtype=torch.uint8, device="meta").permute(2, 0, 1)
    assert meta.stride() == (1, 30, 3)
    cpu = _images(1, 12, 10, seed=1)
    assert fastviews.sources([meta]) is None
    assert fastviews.sources(cpu + [meta]) is None
    assert fastviews.sources([torch.empty(3, 12, 10, dtype=torch.uint8, device="meta")]) is None
