"""Augmentations: descriptors from known parameters, flip, identity, colour vs torchvision.

Tests that render views run on both backends: the torch reference path and the compiled
one (`mmssl.data.fastviews`, skipped with a reason when numba is not installed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from mmssl.data.augment import (
    AugmentConfig,
    ViewParams,
    apply_params,
    make_views,
    sample_params,
)
from mmssl.descriptor import DESCRIPTOR_V1, check_descriptor, render_descriptor


@pytest.fixture(params=["torch", "numba"])
def backend(request):
    if request.param == "numba":
        pytest.importorskip("numba", reason="the compiled view renderer needs numba")
    return request.param


def _images(n: int, h: int = 16, w: int = 16, lo: int = 64, hi: int = 192) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(lo, hi, (3, h, w), generator=g, dtype=torch.uint8) for _ in range(n)]


def test_identity_gives_neutral_vector_and_unchanged_image(backend):
    imgs = _images(3)
    p = ViewParams.identity([(16, 16)] * 3)
    views, desc = apply_params(imgs, p, 16, backend=backend)
    assert torch.allclose(desc, DESCRIPTOR_V1.neutral_tensor(3), atol=1e-6)
    assert torch.allclose(views, torch.stack(imgs).float() / 255, atol=1e-5)


def test_known_parameters_give_expected_vector(backend):
    imgs = _images(1, 20, 40)
    p = ViewParams.identity([(20, 40)])
    p.box[0] = (2, 10, 10, 20)  # top, left, h, w
    p.jitter[0] = True
    p.factors[0] = (1.2, 0.9, 1.1, 0.05)
    p.gray[0] = True
    p.sigma[0] = 0.7
    _, desc = apply_params(imgs, p, 28, backend=backend)
    d = desc[0].tolist()
    check_descriptor(desc)
    assert d[0] == pytest.approx(0.7)
    assert d[1:5] == pytest.approx([0.2, -0.1, 0.1, 0.05])
    assert d[8:12] == pytest.approx([(2 + 5) / 20, (10 + 10) / 40, 0.5, 0.5])
    assert d[12] == 1.0


def test_flip_mirrors_centre_x_and_the_pixels(backend):
    imgs = _images(1, 16, 24)
    p = ViewParams.identity([(16, 24)])
    p.box[0] = (0, 3, 12, 12)
    p.sigma[0] = 1.2  # a blurred flip mirrors too
    v0, d0 = apply_params(imgs, p, 16, backend=backend)
    p.flip[0] = True
    v1, d1 = apply_params(imgs, p, 16, backend=backend)
    assert d1[0, 9].item() == pytest.approx(1 - d0[0, 9].item())
    assert torch.equal(d0[0, [8, 10, 11]], d1[0, [8, 10, 11]])
    assert torch.allclose(v1, v0.flip(-1), atol=1e-6)


@pytest.mark.parametrize("hue_mode", ["hsv", "yiq"])
def test_color_diff_is_measured_mean_change(hue_mode, backend):
    imgs = _images(8)
    cfg = AugmentConfig(jitter_p=1.0, grayscale_p=0.5, blur_p=0.0, hue=0.5, hue_mode=hue_mode)
    p = sample_params(np.random.default_rng(1), [(16, 16)] * 8, cfg)
    views, desc = apply_params(imgs, p, 16, hue_mode, backend=backend)
    p_nocolor = ViewParams(
        p.box, p.flip, p.jitter * False, p.factors, p.order, p.gray * False, p.sigma, p.solarize
    )
    plain, _ = apply_params(imgs, p_nocolor, 16, hue_mode, backend="torch")
    measured = views.mean(dim=(2, 3)) - plain.mean(dim=(2, 3))
    assert torch.allclose(desc[:, 5:8], measured, atol=1e-5)
    assert measured.abs().max() > 1e-3


def test_fused_colour_matches_torchvision_sequence(backend):
    """Mid-range pixels and mild factors: no intermediate clamping, so exact agreement."""
    imgs = _images(12)
    cfg = AugmentConfig(
        brightness=0.2, contrast=0.2, saturation=0.2, hue=0.5, jitter_p=1.0, grayscale_p=0.3
    )
    p = sample_params(np.random.default_rng(3), [(16, 16)] * 12, cfg)
    p.box[:] = (0, 0, 16, 16)
    p.flip[:] = False
    p.sigma[:] = 0
    views, _ = apply_params(imgs, p, 16, "hsv", backend=backend)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i, im in enumerate(imgs):
        y = im.float() / 255
        for op in p.order[i]:
            y = ops[op](y, float(p.factors[i, op]))
        if p.gray[i]:
            y = TF.rgb_to_grayscale(y, 3)
        assert torch.allclose(views[i], y, atol=2e-4), i


def test_batched_crop_matches_roi_align(backend):
    """The grid_sample crop equals torchvision's roi_align (bilinear at bin centres)."""
    from torchvision.ops import roi_align

    imgs = _images(6, 20, 20)
    p = sample_params(np.random.default_rng(0), [(20, 20)] * 6, AugmentConfig())
    plain = ViewParams(
        p.box,
        p.flip,
        p.jitter * False,
        p.factors,
        p.order,
        p.gray * False,
        p.sigma * 0,
        p.solarize * False,
    )
    fast = apply_params(imgs, plain, 24, backend=backend)[0]
    x = torch.stack(imgs).float() / 255
    t, l, h, w = (torch.from_numpy(p.box[:, k]).float() for k in range(4))
    boxes = torch.stack([torch.arange(6.0), l, t, l + w, t + h], dim=1)
    ref = roi_align(x, boxes, (24, 24), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    ref = torch.where(torch.from_numpy(p.flip)[:, None, None, None], ref.flip(-1), ref)
    assert torch.allclose(fast, ref, atol=1e-5)


def test_large_images_take_the_antialiased_path():
    imgs = _images(2, 64, 64)
    p = ViewParams.identity([(64, 64)] * 2)
    views, _ = apply_params(imgs, p, 16)
    ref = F.interpolate(torch.stack(imgs).float() / 255, (16, 16), mode="bilinear", antialias=True)
    assert torch.allclose(views, ref, atol=1e-5)


def test_mixed_sizes_and_crop_bounds():
    sizes = [(10, 30), (40, 12), (17, 17), (300, 200)]
    imgs = [torch.zeros(3, h, w, dtype=torch.uint8) for h, w in sizes]
    rng = np.random.default_rng(0)
    views, descs = make_views(imgs, 3, 16, AugmentConfig(), rng)
    assert len(views) == 3 and views[0].shape == (4, 3, 16, 16) and descs[0].shape == (4, 13)
    for _ in range(50):
        p = sample_params(rng, sizes, AugmentConfig(scale=(0.01, 1.0)))
        for (h, w), (t, l, ch, cw) in zip(sizes, p.box):
            assert 0 <= t and t + ch <= h and 0 <= l and l + cw <= w and ch > 0 and cw > 0


def test_same_rng_same_views():
    imgs = _images(4)
    a = make_views(imgs, 2, 16, AugmentConfig(), np.random.default_rng(5))
    b = make_views(imgs, 2, 16, AugmentConfig(), np.random.default_rng(5))
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))


def test_render_descriptor():
    assert render_descriptor(DESCRIPTOR_V1.neutral_tensor()) == "original image"
    v = DESCRIPTOR_V1.neutral_tensor()
    v[8:12] = torch.tensor([0.31, 0.55, 0.6, 0.7])
    v[4] = 0.08
    v[12] = 1
    assert render_descriptor(v) == "crop 0.42 at (0.31, 0.55), hue +0.08, grayscale"
    with pytest.raises(ValueError, match="13 values"):
        render_descriptor([0.0] * 5)


def test_bad_config():
    with pytest.raises(ValueError, match="hue strength"):
        AugmentConfig(hue=0.6)
    with pytest.raises(ValueError, match="hue_mode"):
        AugmentConfig(hue_mode="lab")
    with pytest.raises(ValueError, match="backend"):
        AugmentConfig(backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        apply_params(_images(1), ViewParams.identity([(16, 16)]), 16, backend="cuda")


@pytest.mark.parametrize("sizes", [[(20, 20)] * 3, [(20, 20), (20, 22), (21, 20)]])
def test_blur_matches_torchvision(sizes, backend):
    """Blur folded into the resampling (same-size batch) or applied after it (mixed sizes)
    equals torchvision's gaussian_blur with the same kernel size and sigma."""
    g = torch.Generator().manual_seed(1)
    imgs = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    p = ViewParams.identity(sizes)
    p.box[:] = (0, 0, 20, 20)
    p.sigma[:] = (0.8, 0.0, 1.7)
    if backend == "numba" and len(set(sizes)) > 1:
        with pytest.raises(ValueError, match="images of one size"):
            apply_params(imgs, p, 20, backend=backend)
        backend = "auto"  # a mixed-size batch takes the torch path
    views, desc = apply_params(imgs, p, 20, backend=backend)
    for i, im in enumerate(imgs):
        ref = im[:, :20, :20].float() / 255
        if p.sigma[i] > 0:
            ref = TF.gaussian_blur(ref, [3, 3], [float(p.sigma[i])] * 2)
        assert torch.allclose(views[i], ref, atol=1e-5), i
    assert desc[:, 0].tolist() == pytest.approx([0.8, 0.0, 1.7])


def test_large_view_path_matches_roi_align_and_torchvision_blur(backend):
    """Views above 64 px take grid_sample + convolution blur; same maths as the small path."""
    from torchvision.ops import roi_align

    imgs = _images(3, 70, 70)
    p = sample_params(np.random.default_rng(2), [(70, 70)] * 3, AugmentConfig())
    p.jitter[:] = False
    p.gray[:] = False
    p.sigma[:] = (0.0, 1.3, 0.0)
    views, _ = apply_params(imgs, p, 72, backend=backend)
    x = torch.stack(imgs).float() / 255
    t, l, h, w = (torch.from_numpy(p.box[:, k]).float() for k in range(4))
    boxes = torch.stack([torch.arange(3.0), l, t, l + w, t + h], dim=1)
    ref = roi_align(x, boxes, (72, 72), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    ref = torch.where(torch.from_numpy(p.flip)[:, None, None, None], ref.flip(-1), ref)
    ref[1] = TF.gaussian_blur(ref[1], [7, 7], [1.3, 1.3])
    assert torch.allclose(views, ref, atol=1e-5)


@pytest.mark.parametrize(
    "image, error",
    [
        (torch.rand(3, 16, 16), TypeError),  # float in [0, 1]: nearly black views before
        (torch.randint(0, 255, (16, 16, 3), dtype=torch.uint8), ValueError),  # HWC
        (torch.randint(0, 255, (1, 16, 16), dtype=torch.uint8), ValueError),  # grey
    ],
)
def test_views_refuse_images_that_are_not_uint8_rgb_chw(image, error):
    cfg = AugmentConfig(backend="auto")
    with pytest.raises(error, match="image 0"):
        make_views([image], 2, 8, cfg, np.random.default_rng(0))
    p = sample_params(np.random.default_rng(0), [(16, 16)], cfg)
    with pytest.raises(error, match="image 0"):
        apply_params([image], p, 8, backend="torch")


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_one_pixel_view_is_refused_by_name(backend):
    # the blur reflects at the view's border: F.pad raised "Padding size should be less
    # than the corresponding input dimension" (torch) or indexed -1 (1 x 1 sources)
    cfg = AugmentConfig(blur_p=1.0, backend=backend)
    images = [torch.zeros(3, 4, 4, dtype=torch.uint8)]
    with pytest.raises(ValueError, match="view size must be an integer >= 2, got 1"):
        make_views(images, 2, 1, cfg, np.random.default_rng(0))
    p = sample_params(np.random.default_rng(0), [(4, 4)], cfg)
    with pytest.raises(ValueError, match="view size must be an integer >= 2, got 1"):
        apply_params(images, p, 1, backend=backend)
    views, _ = make_views(images, 2, 2, cfg, np.random.default_rng(0))  # the least size works
    assert views[0].shape == (1, 3, 2, 2)


@pytest.mark.parametrize("why", ["disable_jit", "no_cache"])
def test_backend_auto_renders_with_torch_when_the_compiled_renderer_cannot_run(
    why, monkeypatch, reloaded_compiled
):
    """NUMBA_DISABLE_JIT (numba's debug switch: its kernels as Python) made backend auto
    crash in fastviews; a read-only install without a cache folder (numba's RuntimeError at
    import) fell back silently, and backend numba then said 'needs numba' of an installed
    numba.  Both now fall back to torch under auto and name the cause under numba."""
    import importlib
    import warnings

    numba = pytest.importorskip("numba", reason="the compiled view renderer needs numba")
    from mmssl.data import fastdraws, fastpng, fastviews  # noqa: F401  # compiled before
    from mmssl.data.decode import compiled, compiled_problem

    if why == "disable_jit":  # set at start-up, numba's njit returns the Python functions
        monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
        says = "NUMBA_DISABLE_JIT is set"
    else:
        real = importlib.import_module

        def no_cache(name, *args):
            if name.startswith("mmssl.data.fast"):
                raise RuntimeError("cannot cache function 'render': no locator available")
            return real(name, *args)

        monkeypatch.setattr(importlib, "import_module", no_cache)
        says = "numba cannot cache the compiled kernels (cannot cache function"
    for name in ("fastviews", "fastdraws", "fastpng"):
        with pytest.warns(UserWarning, match=f"mmssl.data.{name} cannot run: "):
            assert compiled(name) is None  # an installed numba that cannot run is said
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert compiled(name) is None  # once: it runs per decoded image
        assert says in compiled_problem(name)
    imgs = _images(4)
    views = [
        make_views(imgs, 2, 16, AugmentConfig(backend=b), np.random.default_rng(0))
        for b in ("auto", "torch")
    ]
    for a, b in zip(views[0][0] + views[0][1], views[1][0] + views[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ImportError) as err:
        make_views(imgs, 2, 16, AugmentConfig(backend="numba"), np.random.default_rng(0))
    assert str(err.value).startswith(f"backend='numba', but {says}")


@pytest.mark.parametrize("hue_mode", ["yiq", "hsv"])
def test_blur_first_is_simclrs_order_but_for_the_hsv_hue_at_colour_edges(hue_mode, backend):
    """Views blur before their colour jitter (SimCLR blurs after): with the per-pixel affine
    colour ops the two orders agree wherever nothing clips, the exact HSV hue shift differs
    at edges between colours (the module docstring's claim, both ways)."""
    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(80, 176, (4, 3, 4, 4), generator=g, dtype=torch.uint8)
    imgs = list(F.interpolate(blocks, size=(32, 32), mode="nearest"))  # colour blocks, mid-range
    p = ViewParams.identity([(32, 32)] * 4)
    p.jitter[:] = True
    p.factors[:] = (1.1, 0.9, 1.2, 0.08)  # every colour op, nothing leaves [0, 1]
    p.order[:] = (3, 0, 2, 1)
    p.sigma[:] = 1.5
    blurred_first, _ = apply_params(imgs, p, 32, hue_mode, backend=backend)
    p.sigma[:] = 0
    coloured, _ = apply_params(imgs, p, 32, hue_mode, backend=backend)
    simclr = torch.stack([TF.gaussian_blur(v, [3, 3], [1.5, 1.5]) for v in coloured])
    assert 0.05 < coloured.min() and coloured.max() < 0.95  # no clipping either way
    gap = (blurred_first - simclr).abs().max().item()
    assert gap < 1e-5 if hue_mode == "yiq" else gap > 0.02


@pytest.mark.parametrize("sample", ["torch", "auto"])  # the numpy and the compiled draws
@pytest.mark.parametrize(
    "hw, ratio", [((1, 200), (0.3, 0.45)), ((1, 21), (0.3, 0.45)), ((200, 1), (2.5, 3.0))]
)
def test_the_fallback_crop_of_a_one_pixel_thick_image_is_never_empty(hw, ratio, sample):
    # no try fits and the centre crop of the ratio range rounded to 0 px (torchvision's too):
    # a view of mixed sizes failed in F.interpolate, one of a single size recorded width 0
    cfg = AugmentConfig(ratio=ratio, backend=sample)
    p = sample_params(np.random.default_rng(0), [hw] * 4, cfg)
    assert (p.box[:, 2:] >= 1).all(), p.box
    images = [torch.full((3, *hw), 100, dtype=torch.uint8), torch.zeros(3, 5, 5, dtype=torch.uint8)]
    for batch in (images[:1], images):  # one size (batched), mixed sizes (one per view)
        views, descs = make_views(
            batch, 2, 16, AugmentConfig(ratio=ratio), np.random.default_rng(0)
        )
        assert torch.isfinite(views[0]).all() and (descs[0][:, 10:12] > 0).all()
