"""Shard writing: manifest counts, readability by webdataset and tar, determinism, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from data_helpers import png_bytes, write_image_shards
from PIL import Image

from mmssl.data.errors import DataError, SkipCounter
from mmssl.data.shard_inputs import samples_from_folder, samples_from_table
from mmssl.data.shards import ShardWriter, main, write_shards


def _digest(d: str) -> dict[str, str]:
    return {
        n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
        for n in sorted(os.listdir(d))
    }


def test_manifest_matches_webdataset_and_tar(tmp_path):
    pattern = write_image_shards(str(tmp_path), shards=3, per_shard=5)
    manifest = json.load(open(tmp_path / "manifest.json"))
    assert manifest["splits"]["train"] == {"pattern": "train-{000000..000002}.tar", "count": 15}
    for shard in manifest["shards"]:
        path = str(tmp_path / shard["url"])
        samples = list(wds.WebDataset(path, shardshuffle=False))
        assert len(samples) == shard["count"] == 5
        assert set(samples[0]) >= {"__key__", "png", "txt", "json"}
        with tarfile.open(path) as tf:  # plain tar: 3 members per sample, fixed metadata
            members = tf.getmembers()
            assert len(members) == 15
            assert all(m.mtime == 0 and m.uid == 0 for m in members)
    n = sum(1 for _ in wds.WebDataset(pattern, shardshuffle=False))
    assert n == 15


def test_deterministic_bytes(tmp_path):
    write_image_shards(str(tmp_path / "a"), shards=2, per_shard=3)
    write_image_shards(str(tmp_path / "b"), shards=2, per_shard=3)
    assert _digest(str(tmp_path / "a")) == _digest(str(tmp_path / "b"))


@pytest.mark.parametrize("key", ["k", "k" * 120])  # a name over 100 bytes adds header blocks
def test_max_bytes_is_a_bound_on_the_file(tmp_path, key):
    # A member is a 512-byte header (plus a long-name header) and its data padded to 512;
    # a tar ends with two zero blocks and is padded to a 10 KiB record.  The limit holds for
    # the file, as os.stat sees it, and each shard is as full as the limit allows.
    limit = 30_000
    w = ShardWriter(str(tmp_path), "x", max_count=None, max_bytes=limit)
    for i in range(20):
        w.write({"__key__": f"{key}{i:03d}", "bin": bytes(3000)})
    manifest = w.close()
    counts = [s["count"] for s in manifest["shards"]]
    assert sum(counts) == 20 and len(counts) > 1
    for s in manifest["shards"]:
        size = os.path.getsize(tmp_path / s["url"])
        assert size == s["bytes"] <= limit
    header = 512 + (1024 if len(key) > 90 else 0)
    per_record = (20480 - 1024) // (header + 3072)
    assert counts[0] == per_record  # one more member would pass the limit
    one = ShardWriter(str(tmp_path / "one"), "y", max_count=None, max_bytes=100)
    one.write({"__key__": "a", "bin": bytes(3000)})  # a shard holds at least one sample
    one.write({"__key__": "b", "bin": bytes(3000)})
    assert [s["count"] for s in one.close()["shards"]] == [1, 1]


def _run_shards(out, n, fail_at=None, split="train"):
    """write_shards of n samples (2 per shard); the source raises at sample `fail_at`."""
    from mmssl.data.shards import write_shards

    def samples():
        for i in range(n):
            if i == fail_at:
                raise OSError("the source went away")
            yield {"__key__": f"{i:04d}", "txt": f"doc {i} of {n}"}

    return write_shards(samples(), str(out), split, max_count=2, progress=False)


def test_a_failed_run_leaves_the_earlier_shards_and_manifest(tmp_path):
    _run_shards(tmp_path, 6)
    _run_shards(tmp_path, 3, split="val")
    before = _digest(str(tmp_path))
    with pytest.raises(OSError, match="went away"):
        _run_shards(tmp_path, 10, fail_at=7)  # 3 shards written, then the failure
    assert _digest(str(tmp_path)) == before  # nothing overwritten, no partial files left
    with pytest.raises(KeyError), ShardWriter(str(tmp_path), "train", max_count=2) as w:
        w.write({"__key__": "a", "txt": "x"})
        w.write({"__key__": "b", "txt": "x"})
        w.write({"__key__": "c", "txt": "x"})
        raise KeyError("the caller failed")
    assert _digest(str(tmp_path)) == before


def test_a_split_killed_while_it_replaced_its_shards_is_refused_until_rerun(tmp_path, monkeypatch):
    """Killed among the renames of its new shards over the old ones, `mmssl shards` left a
    split part new, part old under the old manifest: read silently, with samples twice."""
    from mmssl.data.urls import check_urls, expand_urls

    _run_shards(tmp_path, 6)  # train-000000..000002, 2 samples each
    _run_shards(tmp_path, 3, split="val")
    real, renamed = os.replace, []

    def killed(src, dst):
        if str(dst).endswith("train-000004.tar"):
            raise KeyboardInterrupt
        renamed.append(str(dst))
        real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            _run_shards(tmp_path, 10)  # train-000000..000004
    assert renamed[-1].endswith("train-000003.tar")  # 0..3 new, one beyond the old three
    train = str(tmp_path / "train-{000000..000002}.tar")
    with pytest.raises(DataError, match=r"stopped while it replaced split 'train'.* again"):
        check_urls(train, expand_urls(train))
    val = str(tmp_path / "val-{000000..000001}.tar")
    check_urls(val, expand_urls(val))  # another split of the folder reads as before
    _run_shards(tmp_path, 3, split="val")  # a rewrite of that split keeps train's mark
    other = tmp_path / "other"
    _run_shards(other, 2)
    both = [*expand_urls(str(other / "train-000000.tar")), *expand_urls(train)]
    with pytest.raises(DataError, match="stopped while it replaced split 'train'"):
        check_urls(both, both)  # the marked folder second
    manifest = _run_shards(tmp_path, 2)  # a shorter rerun: the killed run's shards go too
    assert sorted(p.name for p in tmp_path.glob("train-*")) == ["train-000000.tar"]
    manifest = _run_shards(tmp_path, 10)
    assert "publishing" not in manifest
    assert "publishing" not in json.loads((tmp_path / "manifest.json").read_text())
    train = str(tmp_path / "train-{000000..000004}.tar")
    check_urls(train, expand_urls(train))
    texts = [s["txt"] for s in wds.WebDataset(train, shardshuffle=False)]
    assert texts == [f"doc {i} of 10".encode() for i in range(10)]


def test_a_shorter_rerun_removes_the_split_s_old_shards_only(tmp_path):
    _run_shards(tmp_path, 6)  # train-000000..000002
    _run_shards(tmp_path, 3, split="val")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "train-000009.tar").write_bytes(b"not in the manifest: not ours to delete")
    manifest = _run_shards(tmp_path, 3)  # train-000000..000001
    names = sorted(os.listdir(tmp_path))
    assert names == [
        "manifest.json",
        "notes.txt",
        "train-000000.tar",
        "train-000001.tar",
        "train-000009.tar",
        "val-000000.tar",
        "val-000001.tar",
    ]
    assert [s["url"] for s in manifest["shards"]] == names[2:4] + names[5:]
    assert manifest["splits"]["train"] == {"pattern": "train-{000000..000001}.tar", "count": 3}
    shards = str(tmp_path / "train-{000000..000001}.tar")
    texts = [s["txt"] for s in wds.WebDataset(shards, shardshuffle=False)]
    assert texts == [b"doc 0 of 3", b"doc 1 of 3", b"doc 2 of 3"]


def test_a_damaged_manifest_is_an_error_before_writing(tmp_path):
    (tmp_path / "manifest.json").write_text('{"shards": 3}')
    with pytest.raises(ValueError, match="not a shard manifest"):
        ShardWriter(str(tmp_path), "train")
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_writer_rejects_bad_keys(tmp_path):
    w = ShardWriter(str(tmp_path))
    with pytest.raises(ValueError, match="without dots"):
        w.write({"__key__": "a.b", "txt": "x"})
    with pytest.raises(ValueError, match="has no files"):
        w.write({"__key__": "a"})  # the manifest would count a sample no reader sees
    w.write({"__key__": "a", "txt": "x"})
    with pytest.raises(ValueError, match="duplicate"):
        w.write({"__key__": "a", "txt": "y"})


@pytest.mark.parametrize(
    "sample",
    [
        {"__key__": "d/", "txt": "x"},  # member d/.txt: hidden
        {"__key__": "a\0b", "txt": "x"},  # the tar name ends at the NUL: a.txt is lost
        {"__key__": "k", "": b"x"},  # member k.: no extension
        {"__key__": "k", "a/b": b"x"},  # member k.a/b: key k.a/b, no extension
        {"__key__": "a//b", "txt": "x"},  # read back as a/b: another sample's key
        {"__key__": "k", "png": b"x", "PNG": b"y"},  # read back as png twice
    ],
)
def test_writer_rejects_what_no_reader_would_read_back(tmp_path, sample):
    # the manifest would count a sample that tarfile + webdataset grouping never yield
    w = ShardWriter(str(tmp_path))
    with pytest.raises(ValueError, match="key must be|extension|read back as"):
        w.write(sample)


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), {"score": float("-inf")}, [1, float("nan")]]
)
def test_writer_refuses_nan_and_infinity_in_json(tmp_path, value):
    # json.dumps wrote NaN / Infinity, which is not JSON (a strict parser refuses it, and
    # mmssl's reader counts the field bad_json); the sample is named and nothing is written
    w = ShardWriter(str(tmp_path), "train")
    w.write({"__key__": "good", "json": {"score": 0.5}})
    with pytest.raises(DataError) as err:
        w.write({"__key__": "bad", "txt": "x", "json": value})
    assert str(err.value).startswith("sample 'bad': cannot write json as JSON")
    w.close()
    with tarfile.open(tmp_path / "train-000000.tar") as tf:
        names = tf.getnames()
        member = tf.extractfile("good.json").read()
    assert names == ["good.json"]
    assert json.loads(member, parse_constant=lambda c: pytest.fail(c)) == {"score": 0.5}


def _folder(root):
    for c, cls in enumerate(["cat", "dog"]):
        os.makedirs(root / cls)
        for i in range(3):
            arr = np.full((6, 6, 3), 40 * i + c, np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "dog" / "x.bmp")


def test_cli_folder(tmp_path):
    _folder(tmp_path / "in")
    rc = main(
        [
            "folder",
            str(tmp_path / "in"),
            "--out",
            str(tmp_path / "o"),
            "--max-count",
            "4",
            "--caption-template",
            "a photo of a {}.",
            "--quiet",
        ]
    )
    assert rc == 0
    samples = list(
        wds.WebDataset(str(tmp_path / "o" / "train-{000000..000001}.tar"), shardshuffle=False)
    )
    assert len(samples) == 7
    labels = [json.loads(s["json"])["label"] for s in samples]
    assert labels == [0, 0, 0, 1, 1, 1, 1]
    assert samples[0]["txt"] == b"a photo of a cat."
    assert all("png" in s for s in samples)  # bmp converted to png


def test_cli_csv_and_jsonl(tmp_path):
    _folder(tmp_path)
    (tmp_path / "t.csv").write_text("image,caption,label\ncat/0.png,a cat,0\ndog/1.png,a dog,1\n")
    (tmp_path / "t.jsonl").write_text('{"image": "cat/1.png", "caption": "c"}\n')
    assert main(["csv", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert (
        main(
            [
                "jsonl",
                str(tmp_path / "t.jsonl"),
                "--out",
                str(tmp_path / "o"),
                "--split",
                "val",
                "--quiet",
            ]
        )
        == 0
    )
    m = json.load(open(tmp_path / "o" / "manifest.json"))
    assert m["splits"]["train"]["count"] == 2 and m["splits"]["val"]["count"] == 1
    s = list(wds.WebDataset(str(tmp_path / "o" / "train-000000.tar"), shardshuffle=False))
    assert [x["txt"] for x in s] == [b"a cat", b"a dog"]
    assert json.loads(s[1]["json"])["label"] == 1
    # a spreadsheet's "CSV UTF-8" starts with a byte-order mark
    (tmp_path / "bom.csv").write_text("image,caption\ncat/0.png,a cat\n", encoding="utf-8-sig")
    assert main(["csv", str(tmp_path / "bom.csv"), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    s = list(wds.WebDataset(str(tmp_path / "b" / "train-000000.tar"), shardshuffle=False))
    assert [x["txt"] for x in s] == [b"a cat"]


def test_cli_text(tmp_path):
    (tmp_path / "a.txt").write_text("first para\n\nsecond para\n")
    (tmp_path / "b.txt").write_text("another doc")
    assert (
        main(
            [
                "text",
                str(tmp_path / "a.txt"),
                str(tmp_path / "b.txt"),
                "--out",
                str(tmp_path / "o"),
                "--docs",
                "paragraph",
                "--quiet",
            ]
        )
        == 0
    )
    s = list(wds.WebDataset(str(tmp_path / "o" / "train-000000.tar"), shardshuffle=False))
    assert [x["txt"] for x in s] == [b"first para", b"second para", b"another doc"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["folder", "/nonexistent/x"], "does not exist"),
        # a path of the other kind was said not to exist
        (["folder", "{tmp}/latin1.txt"], "latin1.txt' is a file, not a folder"),
        (["csv", "{tmp}/imgs"], "imgs' is a directory, not a file"),
        (["text", "{tmp}/imgs"], "imgs' is a directory, not a file"),
        (["csv", "{tmp}/bad.csv"], "lacks column"),
        (["csv", "{tmp}/missing.csv"], "no readable image in any of its 1 entries"),
        (["folder", "{tmp}/corrupt"], "its 1 entries (first: cls/a.bmp: "),  # bad_image
        (["text", "{tmp}/latin1.txt"], "not UTF-8"),
        (["text", "{tmp}/empty.txt"], "no samples"),
        (["csv", "{tmp}/short.csv"], "row 1: no caption (got None)"),
        (["jsonl", "{tmp}/null.jsonl"], "row 1: no caption (got None)"),
        (["jsonl", "{tmp}/five.jsonl"], "row 1 is a int, not an object"),
        (["csv", "{tmp}/float.csv"], "label '2.9' is not an integer"),
        (["jsonl", "{tmp}/true.jsonl"], "label True is not an integer"),
        (["jsonl", "{tmp}/T.JSONL"], "row 1: no caption"),  # the kind given, not the suffix
        (["csv", "{tmp}/latin1.csv"], "not UTF-8"),
        (
            ["folder", "{tmp}/imgs", "--caption-template", "a {name}"],
            "needs exactly one '{}' for the class name (found 1: {name})",
        ),
        (["folder", "{tmp}/imgs", "--max-count", "0"], "must be positive"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, args, message):
    _folder(tmp_path / "imgs")
    for name, text in [
        ("short.csv", "image,caption,label\nimgs/cat/0.png\n"),
        ("null.jsonl", '{"image": "imgs/cat/0.png", "caption": null}\n'),
        ("five.jsonl", "5\n"),
        ("float.csv", "image,caption,label\nimgs/cat/0.png,a cat,2.9\n"),
        ("true.jsonl", '{"image": "imgs/cat/0.png", "caption": "c", "label": true}\n'),
        ("T.JSONL", '{"image": "imgs/cat/0.png", "caption": null}\n'),
    ]:
        (tmp_path / name).write_text(text)
    (tmp_path / "latin1.csv").write_bytes(
        "image,caption\nimgs/cat/0.png,caf\xe9\n".encode("latin-1")
    )
    (tmp_path / "bad.csv").write_text("path,text\nx.png,y\n")
    (tmp_path / "missing.csv").write_text("image,caption\nnope.png,y\n")
    os.makedirs(tmp_path / "corrupt" / "cls")
    (tmp_path / "corrupt" / "cls" / "a.bmp").write_bytes(b"BM not really a bitmap")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("  \n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main([*argv, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_png_helper_roundtrip():
    arr = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    import io

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(arr)))), arr)


def _three_good_one_bad(tmp_path, case):
    """4 image entries, the third unreadable; returns the sample source and its counter."""
    _folder(tmp_path)
    skipped = SkipCounter()
    if case == "folder, dangling symlink":
        for name in ["cat/2.png", "dog/0.png", "dog/1.png", "dog/x.bmp"]:
            os.remove(tmp_path / name)
        os.symlink(tmp_path / "gone.png", tmp_path / "cat" / "1a.png")  # sorts third
        return samples_from_folder(str(tmp_path), skipped=skipped), skipped
    images = ["cat/0.png", "cat/1.png", "nope.png", "dog/2.png"]
    if case == "jsonl, a directory":
        os.makedirs(tmp_path / "nope.png")
        table = tmp_path / "t.jsonl"
        table.write_text("".join(json.dumps({"image": p, "caption": p}) + "\n" for p in images))
    else:
        table = tmp_path / "t.csv"
        table.write_text("image,caption\n" + "".join(f"{p},{p}\n" for p in images))
    return samples_from_table(str(table), skipped=skipped), skipped


@pytest.mark.parametrize(
    "case", ["csv, missing file", "jsonl, a directory", "folder, dangling symlink"]
)
def test_an_unreadable_image_is_skipped_counted_and_the_rest_written(tmp_path, case):
    samples, skipped = _three_good_one_bad(tmp_path / "in", case)
    manifest = write_shards(samples, str(tmp_path / "o"), max_count=2, progress=False)
    assert skipped.counts == {"missing_image": 1}
    assert manifest["splits"]["train"] == {"pattern": "train-{000000..000001}.tar", "count": 3}
    read = []
    for shard in manifest["shards"]:  # the manifest against webdataset and plain tar
        path = str(tmp_path / "o" / shard["url"])
        samples = list(wds.WebDataset(path, shardshuffle=False))
        with tarfile.open(path) as tf:
            keys = {m.name.split(".")[0] for m in tf.getmembers()}
        assert len(samples) == shard["count"] == len(keys)
        read += [json.loads(s["json"])["path"] for s in samples]
    assert [s["count"] for s in manifest["shards"]] == [2, 1]
    assert len(read) == 3 and "nope.png" not in read and "cat/1a.png" not in read


def test_cli_reports_the_skipped_images(tmp_path, capsys):
    _folder(tmp_path)
    (tmp_path / "t.csv").write_text("image,caption\ncat/0.png,a\nnope.png,b\ndog/1.png,c\n")
    assert main(["csv", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "wrote 2 samples" in out and "skipped 1 inputs (missing_image: 1)" in out
    s = list(wds.WebDataset(str(tmp_path / "o" / "train-000000.tar"), shardshuffle=False))
    assert [x["txt"] for x in s] == [b"a", b"c"]


def test_no_readable_image_is_an_error_that_writes_nothing(tmp_path, capsys):
    _folder(tmp_path)
    (tmp_path / "t.csv").write_text("image,caption\nnope.png,a\ncat/x.png,b\ngone/x.jpg,c\n")
    os.makedirs(tmp_path / "cat" / "x.png")  # a directory where the image should be
    skipped = SkipCounter()
    out = tmp_path / "o"
    with pytest.raises(
        DataError, match=r"no readable image in any of its 3 entries \(first: row 1"
    ):
        write_shards(samples_from_table(str(tmp_path / "t.csv"), skipped=skipped), str(out))
    assert skipped.counts == {"missing_image": 3} and not out.exists()
    for cls in ["cat", "dog"]:  # a folder whose every image is a dangling symlink
        os.makedirs(tmp_path / "dangling" / cls)
        os.symlink(tmp_path / "gone.png", tmp_path / "dangling" / cls / "a.png")
    assert main(["folder", str(tmp_path / "dangling"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no readable image in any of its 2 entries" in err[0]
    assert not out.exists()


def test_max_bytes_help_says_its_units_are_powers_of_1024(capsys):
    # --max-bytes 1GB is 1024**3 bytes, which the help did not say
    from mmssl.data.shards import _size

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-bytes MAX_BYTES largest shard file: bytes, or with a k/m/g/t suffix" in text
    assert "powers of 1024 (1GB = 1GiB = 1024**3 bytes)" in text
    # what the help says is what the option does
    assert _size("1GB") == _size("1GiB") == _size("1g") == 1_073_741_824
    assert _size("500MB") == 500 * 1_048_576 and _size("2k") == 2048 and _size("100") == 100


@pytest.mark.parametrize(
    "count,ok", [(0, True), (3, True), (-1, False), (True, False), (2.0, False)]
)
def test_manifest_counts_refuses_a_count_that_is_no_sample_count(tmp_path: Path, count, ok) -> None:
    """A negative, boolean or float count is refused: an epoch would be planned over it."""
    from mmssl.data.manifest import manifest_counts

    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"\0" * 1024)
    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {
                "version": 1,
                "shards": [{"url": shard.name, "count": count, "bytes": 1024, "split": "train"}],
                "splits": {},
            }
        )
    )
    if ok:
        assert manifest_counts([str(shard)]) == {str(shard): count}
    else:
        with pytest.raises(DataError, match="is not a shard manifest"):
            manifest_counts([str(shard)])
