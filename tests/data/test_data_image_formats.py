"""Image formats beyond 8-bit jpg/png: 16-bit, 32-bit integer and float greyscale give the
pixels torchvision gives the same data as a 16-bit PNG, through `mmssl shards` and
`decode_image`; Netpbm images (ppm, pgm, pbm, pnm) are read like the others, and a class
folder's files that are no images are counted, not dropped silently."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmssl.data.decode import BadSample, decode_image, find_image
from mmssl.data.shard_inputs import samples_from_table
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


_NETPBM = {"pbm": "1", "pgm": "L", "pnm": "RGB", "ppm": "RGB"}


def _netpbm(path, mode: str, seed: int) -> np.ndarray:
    """A small Netpbm image of `mode` at `path`; its pixels as PIL gives them in RGB."""
    arr = np.random.default_rng(seed).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    img.save(path, "PPM")
    return np.asarray(img.convert("RGB"))


def test_netpbm_images_of_a_class_folder_are_written(tmp_path, capsys):
    expected = {}
    for i, (ext, mode) in enumerate(sorted(_NETPBM.items())):
        (tmp_path / "in" / ext).mkdir(parents=True)
        expected[f"{ext}/x.{ext}"] = _netpbm(tmp_path / "in" / ext / f"x.{ext}", mode, i)
    assert main(["folder", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "wrote 4 samples" in capsys.readouterr().out
    written = list(wds.WebDataset(str(tmp_path / "o" / "train-000000.tar"), shardshuffle=False))
    got = {json.loads(s["json"])["path"]: decode_image(s["png"]) for s in written}
    assert sorted(got) == sorted(expected)
    for path, img in got.items():
        assert np.array_equal(img.permute(1, 2, 0).numpy(), expected[path]), path


def test_a_table_row_naming_a_pgm_is_read(tmp_path):
    expected = _netpbm(tmp_path / "x.pgm", "L", 0)
    (tmp_path / "t.csv").write_text("image,caption\nx.pgm,a grey square\n")
    [sample] = samples_from_table(str(tmp_path / "t.csv"))
    assert np.array_equal(decode_image(sample["png"]).permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("ext", sorted(_NETPBM))
def test_a_netpbm_shard_member_is_the_sample_s_image(tmp_path, ext):
    expected = _netpbm(tmp_path / f"x.{ext}", _NETPBM[ext], 0)
    files = {"txt": b"caption", ext: (tmp_path / f"x.{ext}").read_bytes()}
    assert np.array_equal(decode_image(find_image(files)).permute(1, 2, 0).numpy(), expected)


def test_non_image_files_of_a_class_folder_are_counted_not_dropped_silently(tmp_path, capsys):
    (tmp_path / "in" / "a" / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "in" / "a" / "x.png")
    (tmp_path / "in" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "a" / "sub" / "y.xcf").write_bytes(b"gimp")
    (tmp_path / "in" / "a" / ".DS_Store").write_bytes(b"macOS")  # the OS's: not counted
    assert main(["folder", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert "wrote 1 samples" in (out := capsys.readouterr().out) and "(not_image: 2)" in out
    (tmp_path / "in" / "a" / "x.png").unlink()
    assert main(["folder", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no readable image" in err and "a/notes.txt" in err and "not_image: 2" in err


def test_a_device_or_fifo_named_like_an_image_is_counted_not_read(tmp_path, capsys):
    """A link to /dev/zero was read until memory ran out (SIGABRT) and a FIFO's open waited
    for ever: both are missing_image skips, the regular images are written."""
    (tmp_path / "in" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "in" / "a" / "x.png")
    (tmp_path / "in" / "a" / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "in" / "a" / "fifo.png")
    assert main(["folder", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 samples" in out and "missing_image: 2" in out, out
