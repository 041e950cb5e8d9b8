"""resize_center against torchvision's Resize(size) + CenterCrop(size), open_clip's eval
transform, on the same images."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from mmssl.data.augment import resize_center

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
