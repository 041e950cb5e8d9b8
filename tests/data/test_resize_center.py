"""resize_center against torchvision's Resize(size) + CenterCrop(size), open_clip's eval
transform, on the same images."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from mmssl.data import center
from mmssl.data.center import resize_center

# (h, w, size): the longer side's int() and round() differ (37x64 at 24: 41.51), the crop
# offset's (d - size) // 2 and round((d - size) / 2) differ (d - size = 3, 7, 11),
# upscaling and downscaling, portrait and landscape
CASES = [
    (33, 50, 25),
    (37, 64, 24),
    (64, 37, 24),
    (40, 46, 20),
    (20, 31, 32),
    (31, 20, 32),
    (33, 50, 29),
    (50, 55, 32),
]


def _torchvision(im: torch.Tensor, size: int) -> torch.Tensor:
    v = TF.resize(im.float(), [size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(v, [size, size]).clamp(0, 255) / 255.0


@pytest.mark.parametrize("h,w,size", CASES)
def test_resize_center_matches_torchvision(h: int, w: int, size: int) -> None:
    im = torch.randint(
        0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h * w)
    )
    ours = resize_center([im], size)[0]
    ref = _torchvision(im, size)
    assert ours.shape == ref.shape == (3, size, size)
    # bilinear (antialiased when shrinking) in float on both sides: the same kernel
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # torchvision's uint8 kernels round (fixed-point weights, uint8 output): within a grey level
    ref8 = TF.center_crop(TF.resize(im, [size], antialias=True), [size, size]).float() / 255.0
    assert (ours - ref8).abs().max() <= 1 / 255 + 1e-6


def test_the_cases_tell_the_old_rules_apart() -> None:
    """Every case differs from the old rules (round the longer side, floor the offset) in the
    resized size or the crop offset, so the test above checks the rules themselves."""
    for h, w, size in CASES:
        short, long = min(h, w), max(h, w)
        new = int(size * long / short)
        old = max(size, round(long * size / short))
        assert new != old or (new - size) // 2 != int(round((new - size) / 2.0)), (h, w, size)


# thin images, where the resized image exceeds CROP_ONLY_ABOVE crops: upscaled (no
# antialias: short side 1-3 px), shrunk (antialias: short side above size), both ways round
THIN = [(1, 500, 24), (3, 700, 24), (450, 2, 24), (40, 1500, 24), (1700, 30, 20), (37, 900, 36)]


@pytest.mark.parametrize("h,w,size", THIN)
def test_crop_only_path_matches_torchvision(h: int, w: int, size: int) -> None:
    assert int(size * max(h, w) / min(h, w)) > center.CROP_ONLY_ABOVE * size  # the path taken
    im = torch.randint(
        0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(w)
    )
    torch.testing.assert_close(
        resize_center([im], size)[0], _torchvision(im, size), atol=1e-5, rtol=0
    )


def test_a_banner_resizes_without_resizing_it_whole() -> None:
    """A 1 x 2,000,000 image (6 MB) at 224 px: resized whole it needed 224 x 448M floats (1.2
    TB, an allocation error); the crop alone is the upscaled middle of the banner, each row
    the same, and a constant banner stays constant."""
    im = torch.zeros(3, 1, 2_000_000, dtype=torch.uint8)
    im[0, 0, 1_000_000:] = 255  # the middle: left half black, right half red
    im[1] = 77
    out = resize_center([im], 224)[0]
    assert out.shape == (3, 224, 224)
    assert torch.equal(out, out[:, :1].expand_as(out))  # one source row: every row equal
    torch.testing.assert_close(out[1], torch.full((224, 224), 77 / 255))
    # the crop reads source columns 999,999.0 .. 999,999.998: a ramp from black to red, its
    # coordinates in float32 as torch's (spaced 1/16 px at 1e6)
    red = out[0, 0]
    assert red[0] <= 1 / 16 and red[-1] >= 1 - 1 / 16 and abs(red[112] - 0.5) <= 1 / 16
    assert ((red[1:] - red[:-1]) >= 0).all()
