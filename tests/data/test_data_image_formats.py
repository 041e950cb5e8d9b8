"""Image formats beyond 8-bit jpg/png: 16-bit, 32-bit integer and float greyscale give the
pixels torchvision gives the same data as a 16-bit PNG, through `mmssl shards` and
`decode_image`."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmssl.data.decode import BadSample, decode_image
from mmssl.data.shards import main

_RAMP = np.linspace(0, 65535, 600).reshape(20, 30).astype(np.uint16)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _png_reference() -> np.ndarray:
    """The ramp as a 16-bit PNG through torchvision: (H, W, 3) uint8, value >> 8."""
    ref = decode_image(_encode(Image.fromarray(_RAMP), "PNG")).permute(1, 2, 0).numpy()
    assert np.array_equal(ref[..., 0], (_RAMP >> 8).astype(np.uint8))
    return ref


_SIXTEEN_BIT = {
    "tif I;16": lambda: _encode(Image.fromarray(_RAMP), "TIFF"),
    "tif I;16B": lambda: _encode(Image.fromarray(_RAMP.astype(">u2")), "TIFF"),
    "tif I (int32)": lambda: _encode(Image.fromarray(_RAMP.astype(np.int32)), "TIFF"),
    "pgm 16-bit": lambda: _encode(Image.fromarray(_RAMP), "PPM"),
}


@pytest.mark.parametrize("name", sorted(_SIXTEEN_BIT))
def test_16_bit_greyscale_decodes_as_the_same_16_bit_png(name):
    assert np.array_equal(
        decode_image(_SIXTEEN_BIT[name]()).permute(1, 2, 0).numpy(), _png_reference()
    )


def test_a_16_bit_tif_in_a_class_folder_is_written_as_the_16_bit_png_decodes(tmp_path):
    for cls, ext in (("a", "tif"), ("b", "png")):
        (tmp_path / "in" / cls).mkdir(parents=True)
        Image.fromarray(_RAMP).save(tmp_path / "in" / cls / f"ramp.{ext}")
    assert main(["folder", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    written = list(wds.WebDataset(str(tmp_path / "o" / "train-000000.tar"), shardshuffle=False))
    assert [json.loads(s["json"])["path"] for s in written] == ["a/ramp.tif", "b/ramp.png"]
    ref = _png_reference()
    for s in written:
        assert np.array_equal(decode_image(s["png"]).permute(1, 2, 0).numpy(), ref)


def test_float_greyscale_is_read_as_0_to_1_and_other_ranges_are_refused():
    ramp = (_RAMP / 65535).astype(np.float32)
    img = decode_image(_encode(Image.fromarray(ramp), "TIFF"))
    assert np.array_equal(img[0].numpy(), np.round(ramp * 255).astype(np.uint8))
    for bad in (ramp * 255, np.full((4, 4), np.nan, np.float32)):
        with pytest.raises(BadSample, match="not within") as err:
            decode_image(_encode(Image.fromarray(bad.astype(np.float32)), "TIFF"))
        assert err.value.kind == "bad_image"
    with pytest.raises(BadSample, match="not 16-bit") as err:
        decode_image(_encode(Image.fromarray(_RAMP.astype(np.int32) * 4), "TIFF"))
    assert err.value.kind == "bad_image"
