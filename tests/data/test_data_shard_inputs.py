"""`mmssl shards` on bad input: undecodable images, caption templates, label columns, nested
class folders and byte-order marks (each skipped and counted, or refused with a clear error)."""

from __future__ import annotations

import io
import json
import logging
import zlib

import numpy as np
import pytest
import webdataset as wds
from data_helpers import png_flipped, png_with_data
from PIL import Image

from mmssl.data import errors
from mmssl.data.shard_inputs import samples_from_table
from mmssl.data.shards import main


def _save(path, fmt="PNG", value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path, fmt)


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()[:-200]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def _png_text_first() -> bytes:
    """A whole 8 x 8 PNG with a tEXt chunk before IHDR: PIL decodes it; decode_image (as
    libpng) wants IHDR first."""
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 5, np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    return data[:8] + _png_chunk(b"tEXt", b"k\0v") + data[8:]


_BROKEN = {
    "broken.png": np.random.default_rng(1).bytes(300),
    "broken.jpg": _truncated_jpeg(),  # passes PIL's verify(), not a decode
    "broken.bmp": b"BM not really a bitmap",
    # PIL decodes it; torchvision's decoder, which training uses, crashes on it
    "idat_crc.png": png_flipped(np.full((8, 8, 3), 7, np.uint8), "crc"),
    # CRCs right, half the rows missing: PIL decodes it with the rest black; libpng dies
    "short_rows.png": png_with_data(8, 8, zlib.compress(bytes(4 * 25))),
    # PIL decodes it, decode_image refuses it: shards that training and mmssl eval then lost
    "text_first.png": _png_text_first(),
}


def _read(out, split="train"):
    return list(wds.WebDataset(str(out / f"{split}-000000.tar"), shardshuffle=False))


def _run(capsys, *argv):
    """main's exit code, stdout and stderr."""
    rc = main([*map(str, argv), "--quiet"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("name", sorted(_BROKEN))
def test_an_undecodable_image_is_skipped_counted_and_named(
    tmp_path, capsys, caplog, monkeypatch, name
):
    monkeypatch.setattr(errors, "_LOGGED", set())  # the first bad_image of the process warns
    _save(tmp_path / "in" / "cat" / "0.png")
    _save(tmp_path / "in" / "dog" / "0.png", value=9)
    (tmp_path / "in" / "cat" / name).write_bytes(_BROKEN[name])
    with caplog.at_level(logging.WARNING, logger="mmssl.data"):
        rc, out, err = _run(capsys, "folder", tmp_path / "in", "--out", tmp_path / "o")
    assert rc == 0 and "wrote 2 samples" in out and "(bad_image: 1)" in out
    assert f"bad_image) in {tmp_path / 'in'}: cat/{name}: " in caplog.text
    paths = [json.loads(s["json"])["path"] for s in _read(tmp_path / "o")]
    assert paths == ["cat/0.png", "dog/0.png"]
    # a table's row the same way
    (tmp_path / "in" / "t.csv").write_text(f"image,caption\ncat/{name},a\ndog/0.png,b\n")
    rc, out, _ = _run(capsys, "csv", tmp_path / "in" / "t.csv", "--out", tmp_path / "t")
    assert rc == 0 and "wrote 1 samples" in out and "(bad_image: 1)" in out
    assert [s["txt"] for s in _read(tmp_path / "t")] == [b"b"]


def test_a_table_row_whose_path_is_no_image_is_skipped_and_counted(tmp_path, capsys):
    """As a class folder's file: counted `not_image`, the other rows written (it stopped
    the run, and the shards written so far were removed)."""
    _save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "x.avif").write_bytes(b"\0" * 64)
    (tmp_path / "in" / "t.csv").write_text("image,caption\nx.avif,a\na.png,b\n")
    rc, out, _ = _run(capsys, "csv", tmp_path / "in" / "t.csv", "--out", tmp_path / "t")
    assert rc == 0 and "wrote 1 samples" in out and "(not_image: 1)" in out
    assert [s["txt"] for s in _read(tmp_path / "t")] == [b"b"]


def test_no_decodable_image_is_an_error_that_says_why(tmp_path, capsys):
    for name in ["broken.png", "broken.jpg"]:
        (tmp_path / "in" / "cat").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "cat" / name).write_bytes(_BROKEN[name])
    rc, _, err = _run(capsys, "folder", tmp_path / "in", "--out", tmp_path / "o")
    assert rc == 2 and "no readable image in any of its 2 entries (first: cat/broken.jpg: " in err
    assert err.strip().endswith("skipped: bad_image: 2")
    (tmp_path / "t.csv").write_text("image,caption\nin/cat/broken.png,a\nnope.png,b\n")
    rc, _, err = _run(capsys, "csv", tmp_path / "t.csv", "--out", tmp_path / "o")
    assert rc == 2 and err.strip().endswith("skipped: bad_image: 1, missing_image: 1")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "template, found",
    [
        ("a photo of a cat", "found 0)"),
        ("{} and {}", "found 2: {}, {})"),
        ("a {0} {0}", "found 2: {0}, {0})"),
        ("a {cls}", "found 1: {cls})"),
    ],
)
def test_a_caption_template_needs_exactly_one_placeholder(tmp_path, capsys, template, found):
    _save(tmp_path / "in" / "cat" / "0.png")
    argv = ["folder", tmp_path / "in", "--out", tmp_path / "o", "--caption-template", template]
    rc, _, err = _run(capsys, *argv)
    needs = f"caption template {template!r} needs exactly one '{{}}' for the class name ("
    assert rc == 2 and needs + found in err
    assert not (tmp_path / "o").exists()


def test_a_caption_template_that_does_not_format_a_name_is_refused(tmp_path, capsys):
    _save(tmp_path / "in" / "cat" / "0.png")
    argv = ["folder", tmp_path / "in", "--out", tmp_path / "o", "--caption-template", "a {:d}"]
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and "caption template 'a {:d}' does not format a class name (" in err


@pytest.mark.parametrize("template", ["a photo of a {}.", "a photo of a {0}."])
def test_a_caption_template_takes_the_class_as_an_empty_or_0_field(tmp_path, capsys, template):
    _save(tmp_path / "in" / "tabby_cat" / "0.png")
    argv = ["folder", tmp_path / "in", "--out", tmp_path / "o", "--caption-template", template]
    assert _run(capsys, *argv)[0] == 0
    assert [s["txt"] for s in _read(tmp_path / "o")] == [b"a photo of a tabby cat."]


def _tables(tmp_path):
    _save(tmp_path / "a.png")
    (tmp_path / "t.csv").write_text("image,caption,label\na.png,x,1\n")
    (tmp_path / "t.jsonl").write_text(
        '{"image": "a.png", "caption": "x"}\n{"image": "a.png", "caption": "y", "cls": 3}\n'
    )


@pytest.mark.parametrize(
    "kind, col, message",
    [
        ("csv", "lbl", "label column 'lbl' is not in its header (columns: caption, image, label)"),
        ("jsonl", "lbl", "label column 'lbl' is not in its records (columns: caption, cls, image)"),
    ],
)
def test_a_label_column_given_must_exist(tmp_path, capsys, kind, col, message):
    _tables(tmp_path)
    rc, _, err = _run(
        capsys, kind, tmp_path / f"t.{kind}", "--out", tmp_path / "o", "--label-col", col
    )
    assert rc == 2 and message in err
    assert not any((tmp_path / "o").rglob("*"))  # a jsonl's shards are written, then deleted


def test_label_column_default_is_optional_and_a_given_one_is_read(tmp_path, capsys):
    _tables(tmp_path)
    assert _run(capsys, "jsonl", tmp_path / "t.jsonl", "--out", tmp_path / "o")[0] == 0
    assert [json.loads(s["json"]).get("label") for s in _read(tmp_path / "o")] == [None, None]
    argv = ["jsonl", tmp_path / "t.jsonl", "--out", tmp_path / "o", "--label-col", "cls"]
    assert _run(capsys, *argv)[0] == 0  # in one record of two
    assert [json.loads(s["json"]).get("label") for s in _read(tmp_path / "o")] == [None, 3]
    argv = ["csv", tmp_path / "t.csv", "--out", tmp_path / "o", "--label-col", ""]
    assert _run(capsys, *argv)[0] == 0
    assert "label" not in json.loads(_read(tmp_path / "o")[0]["json"])


def test_a_header_only_csv_with_a_label_column_has_no_samples_to_write(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("image,caption,label\n")
    for extra in [[], ["--label-col", "label"]]:
        rc, _, err = _run(capsys, "csv", tmp_path / "t.csv", "--out", tmp_path / "o", *extra)
        assert rc == 2 and "no samples to write" in err and "label column" not in err


def test_samples_from_table_reads_label_by_default_and_none_or_empty_means_no_labels(tmp_path):
    _tables(tmp_path)
    table = str(tmp_path / "t.csv")
    assert [s["json"] for s in samples_from_table(table)] == [{"path": "a.png", "label": 1}]
    for no_labels in (None, ""):
        samples = samples_from_table(table, label_col=no_labels)
        assert [s["json"] for s in samples] == [{"path": "a.png"}]
    jsonl = str(tmp_path / "t.jsonl")  # no "label" column: the default reads none
    assert [s["json"].get("label") for s in samples_from_table(jsonl)] == [None, None]


def test_the_cli_reads_a_label_column_by_default(tmp_path, capsys):
    _tables(tmp_path)
    assert _run(capsys, "csv", tmp_path / "t.csv", "--out", tmp_path / "o")[0] == 0
    assert json.loads(_read(tmp_path / "o")[0]["json"])["label"] == 1


def test_symlinked_subfolders_of_a_class_are_followed_once_and_loops_end(tmp_path, capsys):
    _save(tmp_path / "in" / "cat" / "a.png")
    _save(tmp_path / "elsewhere" / "b.png")
    (tmp_path / "in" / "cat" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "in" / "cat" / "linked_again").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "loop").symlink_to(tmp_path / "in" / "cat")
    rc, out, _ = _run(capsys, "folder", tmp_path / "in", "--out", tmp_path / "o")
    assert rc == 0 and "wrote 2 samples" in out
    paths = [json.loads(s["json"])["path"] for s in _read(tmp_path / "o")]
    assert paths == ["cat/a.png", "cat/linked/b.png"]


def test_a_real_subfolder_keeps_its_name_beside_a_link_to_it(tmp_path, capsys):
    """A link that sorts before the folder it points to does not take its images' paths."""
    _save(tmp_path / "in" / "cat" / "z" / "i.png")
    (tmp_path / "in" / "cat" / "a_link").symlink_to(tmp_path / "in" / "cat" / "z")
    rc, out, _ = _run(capsys, "folder", tmp_path / "in", "--out", tmp_path / "o")
    assert rc == 0 and "wrote 1 samples" in out
    assert [json.loads(s["json"])["path"] for s in _read(tmp_path / "o")] == ["cat/z/i.png"]


def test_images_in_subfolders_of_a_class_are_written_in_sorted_path_order(tmp_path, capsys):
    for rel in ["cat/b.png", "cat/sub/a.png", "cat/a/z.png", "dog/x/y/z.png"]:
        _save(tmp_path / "in" / rel)
    (tmp_path / "in" / "cat" / "sub" / "notes.txt").write_text("not an image")
    rc, out, _ = _run(capsys, "folder", tmp_path / "in", "--out", tmp_path / "o")
    assert rc == 0 and "wrote 4 samples" in out and "(not_image: 1)" in out
    meta = [json.loads(s["json"]) for s in _read(tmp_path / "o")]
    assert [(m["label"], m["path"]) for m in meta] == [
        (0, "cat/a/z.png"),
        (0, "cat/b.png"),
        (0, "cat/sub/a.png"),
        (1, "dog/x/y/z.png"),
    ]


def test_a_text_file_s_byte_order_mark_is_not_part_of_the_document(tmp_path, capsys):
    (tmp_path / "bom.txt").write_text("first\n\nsecond\n", encoding="utf-8-sig")
    argv = ["text", tmp_path / "bom.txt", "--out", tmp_path / "o", "--docs", "paragraph"]
    assert _run(capsys, *argv)[0] == 0
    assert [s["txt"] for s in _read(tmp_path / "o")] == [b"first", b"second"]


@pytest.mark.parametrize(
    "table",
    [
        "image,caption\ncat/0.png,a cat, sitting\n",  # the caption would lose ", sitting"
        "file,text\ncat/0.png,cap,extra\n",  # and lacks the default columns too
        "image,caption,label\ncat/0.png,a cat, dog,\n",  # caption "a cat", label " dog"
    ],
)
def test_a_csv_row_with_more_fields_than_its_header_is_refused_naming_the_line(
    tmp_path, capsys, table
):
    _save(tmp_path / "cat" / "0.png")
    (tmp_path / "t.csv").write_text(table)
    rc, out, err = _run(capsys, "csv", tmp_path / "t.csv", "--out", tmp_path / "o")
    assert rc == 2 and f"{tmp_path / 't.csv'}:2: 1 more field(s) than the header's" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def _big(path, side):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(path, "PNG")


def test_an_image_larger_than_max_pixels_is_skipped_and_counted(tmp_path, capsys, monkeypatch):
    """Written and counted in the manifest, it was skipped by training's decoder at the same
    limit (the manifest's count then exceeded the samples an epoch has); one past PIL's own
    limit was counted as bad_image."""
    from mmssl.data.decode import BadSample, decode_image

    _save(tmp_path / "in" / "cat" / "0.png")
    _big(tmp_path / "in" / "cat" / "big.png", 100)
    with pytest.raises(BadSample) as bad:  # what training would do
        decode_image((tmp_path / "in" / "cat" / "big.png").read_bytes(), 5000)
    assert bad.value.kind == "image_too_large"
    rc, out, _ = _run(
        capsys, "folder", tmp_path / "in", "--out", tmp_path / "o", "--max-pixels", 5000
    )
    assert rc == 0 and "wrote 1 samples" in out and "(image_too_large: 1)" in out
    assert [json.loads(s["json"])["path"] for s in _read(tmp_path / "o")] == ["cat/0.png"]
    (tmp_path / "in" / "t.csv").write_text("image,caption\ncat/big.png,a\ncat/0.png,b\n")
    rc, out, _ = _run(
        capsys, "csv", tmp_path / "in" / "t.csv", "--out", tmp_path / "t", "--max-pixels", 5000
    )
    assert rc == 0 and "wrote 1 samples" in out and "(image_too_large: 1)" in out
    # past PIL's decompression-bomb limit (2x MAX_IMAGE_PIXELS, ~179 M pixels by default)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    rc, out, _ = _run(
        capsys, "folder", tmp_path / "in", "--out", tmp_path / "p", "--max-pixels", 10**9
    )
    assert rc == 0 and "wrote 1 samples" in out and "(image_too_large: 1)" in out
    rc, _, err = _run(capsys, "folder", tmp_path / "in", "--out", tmp_path / "q", "--max-pixels", 0)
    assert rc == 2 and "--max-pixels must be >= 1" in err


@pytest.mark.parametrize("out", ["00_shards", "cat/shards", "."])
def test_shards_written_into_the_image_folder_are_refused(tmp_path, capsys, out):
    """Written there, the next run read the output folder as a class: "00_shards" sorted
    first, and every label moved up by one."""
    _save(tmp_path / "in" / "cat" / "0.png")
    _save(tmp_path / "in" / "dog" / "0.png", value=9)
    rc, _, err = _run(capsys, "folder", tmp_path / "in", "--out", tmp_path / "in" / out)
    assert rc == 2 and "is inside the image folder" in err
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["cat", "dog"]
    assert not (tmp_path / "in" / "cat" / "shards").exists()


def test_a_class_folder_without_images_is_refused(tmp_path, capsys):
    """Its label was left without a sample (a/, b_empty/, c/ gave labels 0 and 2), silently;
    torchvision's ImageFolder refuses one too."""
    _save(tmp_path / "in" / "a" / "0.png")
    (tmp_path / "in" / "b_empty").mkdir()
    (tmp_path / "in" / "b_empty" / "notes.txt").write_text("no images here")
    _save(tmp_path / "in" / "c" / "0.png")
    rc, _, err = _run(capsys, "folder", tmp_path / "in", "--out", tmp_path / "o")
    assert rc == 2 and "'b_empty' hold no image file" in err
    assert not (tmp_path / "o").exists()


def test_a_quote_that_is_never_closed_is_an_error_naming_the_file(tmp_path, capsys):
    """A caption opening a quote it never closes read every later row into that caption: one
    sample written, exit 0 (or, past csv's 131072-character field limit, a traceback).
    csv's strict mode, as Python's own reader offers, makes both an error; a quoted
    caption over several lines still reads."""
    _save(tmp_path / "a.png")
    rows = [f"a.png,caption number {i} with some text to make the row long" for i in range(3000)]
    for n in (99, 3000):
        table = tmp_path / f"t{n}.csv"
        table.write_text("\n".join(["image,caption", 'a.png,"unclosed quote', *rows[:n]]) + "\n")
        rc, out, err = _run(capsys, "csv", table, "--out", tmp_path / f"o{n}")
        assert rc == 2 and f"t{n}.csv:" in err and "not valid CSV" in err and "quote" in err
        assert not (tmp_path / f"o{n}").exists()
    (tmp_path / "ok.csv").write_text('image,caption\na.png,"two\nlines, ""quoted"""\na.png,b\n')
    rc, out, _ = _run(capsys, "csv", tmp_path / "ok.csv", "--out", tmp_path / "ok")
    assert rc == 0 and [s["txt"] for s in _read(tmp_path / "ok")] == [b'two\nlines, "quoted"', b"b"]


def test_images_beside_the_class_folders_are_counted_not_dropped_unsaid(tmp_path, capsys):
    """torchvision's ImageFolder leaves them out, as mmssl does, but they went unmentioned:
    a folder of images with a thumbnails subfolder wrote the thumbnails as one class."""
    for name in ["cat/a.png", "x1.png", "x2.jpg", "x3.webp", "notes.txt"]:
        if name.endswith(".txt"):
            (tmp_path / "in" / name).write_text("x")
        else:
            _save(tmp_path / "in" / name, "WEBP" if name.endswith("webp") else "PNG")
    rc, out, _ = _run(capsys, "folder", tmp_path / "in", "--out", tmp_path / "o")
    assert rc == 0 and "wrote 1 samples" in out and "(no_class: 3)" in out
    (tmp_path / "flat").mkdir()
    _save(tmp_path / "flat" / "y.png")
    rc, _, err = _run(capsys, "folder", tmp_path / "flat", "--out", tmp_path / "o2")
    assert rc == 2 and "has no class subfolders (it holds 1 images directly, in no class)" in err


def test_a_table_without_captions_with_an_empty_caption_column(tmp_path, capsys):
    """An image,label table (classification shards) needed a made-up caption column:
    --caption-col '' writes images and labels alone."""
    _save(tmp_path / "a.png", value=3)
    _save(tmp_path / "b.png", value=9)
    (tmp_path / "t.csv").write_text("image,label\na.png,0\nb.png,1\n")
    rc, _, err = _run(capsys, "csv", tmp_path / "t.csv", "--out", tmp_path / "x")
    assert rc == 2 and "lacks column 'image' or 'caption'" in err  # the default still wants one
    rc, out, _ = _run(
        capsys, "csv", tmp_path / "t.csv", "--out", tmp_path / "o", "--caption-col", ""
    )
    assert rc == 0 and "wrote 2 samples" in out
    got = _read(tmp_path / "o")
    assert [json.loads(s["json"])["label"] for s in got] == [0, 1]
    assert all("txt" not in s and "png" in s for s in got)
    rows = list(samples_from_table(str(tmp_path / "t.csv"), caption_col=None))
    assert [r["json"]["label"] for r in rows] == [0, 1] and all("txt" not in r for r in rows)


@pytest.mark.parametrize(
    "body, line",
    [
        ('a.png,one\nb.png,"x" y\nc.png,three\n', 3),  # text after a closing quote: line 3
        ('a.png,one\nb.png,"never closed\nc.png,three\nd.png,four\n', 5),  # read to the end
    ],
)
def test_a_malformed_csv_row_names_the_line_the_reader_failed_at(tmp_path, body, line):
    """DictReader's line_num moves only once a row parsed: the error named line 2, a good
    row; the inner reader's is csv.reader's own line."""
    (tmp_path / "t.csv").write_text("image,caption\n" + body)
    with pytest.raises(errors.DataError, match=rf"t\.csv:{line}: not valid CSV"):
        list(samples_from_table(str(tmp_path / "t.csv")))
