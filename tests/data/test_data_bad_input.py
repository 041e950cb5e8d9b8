"""Bad input is skipped and counted by kind, the stream continues; all-bad sources raise."""

from __future__ import annotations

import io
import itertools
import json
import os
import struct
import tarfile
import zlib
from typing import Any

import numpy as np
import pytest
import torch
from data_helpers import StubTokenizer, adam7_rows, png_bytes, png_flipped, png_with_data

from mmssl.data.decode import decode_fields, decode_text
from mmssl.data.errors import DataError
from mmssl.data.pipeline import Source, build_pipeline
from mmssl.data.shards import ShardWriter
from mmssl.eval.features import detect_fields


def _good(i: int) -> dict:
    arr = np.full((6, 6, 3), i % 256, np.uint8)
    return {"__key__": f"g{i:04d}", "png": png_bytes(arr), "txt": f"good {i}", "json": {"i": i}}


def _bomb_png() -> bytes:
    """A valid PNG header declaring 100000 x 100000 pixels (a decompression bomb)."""
    data = bytearray(png_bytes(np.zeros((4, 4, 3), np.uint8)))
    ihdr = bytearray(data[12:29])  # type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", 100_000, 100_000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


BAD = {
    "bad_image": {"png": os.urandom(200), "txt": "noise"},
    "missing_caption": {"png": png_bytes(np.zeros((6, 6, 3), np.uint8))},
    "bad_text": {"png": png_bytes(np.zeros((6, 6, 3), np.uint8)), "txt": b"\xff\xfe\xfa"},
    "image_too_large": {"png": _bomb_png(), "txt": "bomb"},
}


def _shards(tmp_path, bad: dict | None, n_bad: int = 2) -> str:
    w = ShardWriter(str(tmp_path), "s", max_count=6)
    for i in range(12):
        if bad is not None and i % 6 < n_bad:
            w.write({"__key__": f"b{i:04d}", **bad})
        else:
            w.write(_good(i))
    w.close()
    return str(tmp_path / "s-{000000..000001}.tar")


def _run(urls, n: int = 6, **kw) -> tuple[list[str], dict[str, int]]:
    args = dict(batch_size=4, rank=0, world_size=1, image_size=6, num_views=1, shuffle=3)
    args.update(kw)
    pl = build_pipeline(urls, **args)
    keys = [k for b in itertools.islice(pl, n) for k in b["__key__"]]
    return keys, pl.skipped


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_sample_is_skipped_and_counted(tmp_path, kind):
    keys, skipped = _run(_shards(tmp_path, BAD[kind]))
    assert len(keys) == 24 and all(k.startswith("g") for k in keys)
    assert skipped.get(kind, 0) >= 1 and set(skipped) == {kind}


def test_pixel_limit_is_configurable(tmp_path):
    with pytest.raises(DataError, match="every sample is bad"):
        _run(_shards(tmp_path, None), n=1, max_pixels=35)  # every image is 6x6 = 36 pixels


def test_truncated_tar(tmp_path):
    urls = _shards(tmp_path, None)
    path = tmp_path / "s-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    keys, skipped = _run(urls)
    assert skipped == {"truncated_tar": skipped["truncated_tar"]} and skipped["truncated_tar"] >= 1
    assert {k for k in keys} >= {"g0000", "g0001"}


def test_empty_shard(tmp_path):
    _shards(tmp_path, None)
    (tmp_path / "s-000002.tar").write_bytes(b"")
    keys, skipped = _run(str(tmp_path / "s-{000000..000002}.tar"), n=8)
    assert skipped.get("empty_shard", 0) >= 1 and len(keys) == 32


def test_failing_pipe_and_working_pipe(tmp_path):
    _shards(tmp_path, None)
    urls = [f"pipe:cat {tmp_path / 's-000000.tar'}", "pipe:echo oops >&2; exit 3"]
    keys, skipped = _run(urls)
    assert skipped.get("pipe_error", 0) >= 1 and len(keys) == 24
    assert all(k.startswith("g") for k in keys)


def test_a_pipe_command_reading_stdin_ends_instead_of_waiting():
    # `pipe:cat $SHARD` with SHARD unset is `cat`: it read the pipeline's own stdin (the
    # terminal, or here a pipe nobody writes to) and the stream hung for ever
    import subprocess
    import sys

    code = (
        "from mmssl.data.errors import SkipCounter\n"
        "from mmssl.data.tario import iter_shard\n"
        "c = SkipCounter()\n"
        "print(len(list(iter_shard('pipe:cat', c))), c.counts)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:  # its stdin stays open and silent, like a terminal nobody types into
        try:
            proc.wait(timeout=60)  # not communicate(), which would close its stdin
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("iter_shard('pipe:cat') waited on stdin") from None
        assert proc.stdout is not None and proc.stdout.read().strip() == "0 {'bad_tar': 1}"


def test_missing_and_bad_json_field(tmp_path):
    w = ShardWriter(str(tmp_path), "j", max_count=4)
    for i in range(8):
        sample = _good(i)
        if i == 1:
            sample["json"] = {"other": 1}
        if i == 2:
            sample["json"] = b"{not json"
        if i == 4:
            sample["json"] = {"i": 2**70}  # valid JSON, but no tensor holds it
        w.write(sample)
    w.close()
    keys, skipped = _run(str(tmp_path / "j-{000000..000001}.tar"), json_fields=("i",), n=3)
    assert skipped.get("missing_field", 0) >= 1 and skipped.get("bad_json", 0) >= 1
    assert {"g0001", "g0002", "g0004"}.isdisjoint(keys) and "g0003" in keys


def test_a_byte_order_mark_before_json_or_a_caption_is_dropped(tmp_path):
    """Windows tools write UTF-8 with a byte-order mark: json.loads refused the str
    ("Unexpected UTF-8 BOM") and the caption kept U+FEFF as its first character."""
    bom = b"\xef\xbb\xbf"
    files = {"json": bom + b'{"label": 3}', "txt": bom + b"a red digit"}
    assert decode_fields(files, ("label",)) == {"label": 3}
    assert decode_text(files) == "a red digit"
    w = ShardWriter(str(tmp_path), "b", max_count=4)
    for i in range(4):
        w.write({**_good(i), "json": bom + b'{"label": %d}' % i})
    w.close()
    urls = [str(tmp_path / "b-000000.tar")]
    assert detect_fields(urls) == ["label"]
    keys, skipped = _run(urls[0], json_fields=("label",), n=1)
    assert not skipped and len(keys) == 4


@pytest.mark.parametrize("value", [b"NaN", b"-Infinity", b"1e400", b"-1.5e300"])
def test_a_non_finite_json_field_is_bad_json(tmp_path, value):
    # Python's json.loads takes NaN/Infinity (not JSON) and reads 1e400 as inf; as a label
    # it equals no other label, not even its own.  -1.5e300 is finite, but -inf in a
    # float32 batch column
    w = ShardWriter(str(tmp_path), "n", max_count=6)
    for i in range(12):
        sample = _good(i)
        if i % 6 == 1:
            sample["json"] = b'{"i": ' + value + b"}"
        w.write(sample)
    w.close()
    pl = build_pipeline(
        str(tmp_path / "n-{000000..000001}.tar"), mode="epoch", batch_size=5, rank=0,
        world_size=1, image_size=6, num_views=0, json_fields=("i",), shuffle=1,
    )  # fmt: skip
    batches = list(pl)
    keys = [k for b in batches for k in b["__key__"]]
    assert sorted(keys) == [f"g{i:04d}" for i in range(12) if i % 6 != 1]
    assert all(torch.isfinite(b["i"].double()).all() for b in batches)
    assert pl.skipped == {"bad_json": 2}


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (1, 2)])
def test_an_epoch_counts_each_bad_sample_once_though_slots_reread(tmp_path, world, workers):
    """Bad samples eat a slot's spares, so it reads its part again (and then all shards):
    the re-read bad samples were counted again (92 missing captions for 48 in the data)."""
    w = ShardWriter(str(tmp_path), "h", max_count=25)
    bad = {i for i in range(100) if i % 25 < 12}  # 48 of 100 without a caption
    for i in range(100):
        sample = _good(i)
        if i in bad:
            del sample["txt"]
        w.write(sample)
    w.close()
    skipped: dict[str, int] = {}
    for rank in range(world):
        pl = build_pipeline(
            str(tmp_path / "h-{000000..000003}.tar"), mode="epoch", batch_size=4, rank=rank,
            world_size=world, num_workers=workers, image_size=6, num_views=0, shuffle=1,
        )  # fmt: skip
        keys = [k for b in pl for k in b["__key__"]]
        assert len(keys) == 100 // world // 4 * 4 and not {f"g{i:04d}" for i in bad} & set(keys)
        for kind, n in pl.skipped.items():
            skipped[kind] = skipped.get(kind, 0) + n
    assert skipped == {"missing_caption": 48}


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_every_sample_bad_raises(tmp_path, mode):
    urls = _shards(tmp_path, BAD["bad_image"], n_bad=6)
    with pytest.raises(DataError, match="every sample is bad"):
        _run(urls, mode=mode)


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_a_bad_window_is_not_an_all_bad_source(tmp_path, mode):
    # without shuffling a window is one sample: one bad sample in a one-shard source, and
    # a wholly bad shard followed by a bad sample in a good one, are skips, not "all bad"
    w = ShardWriter(str(tmp_path), "s", max_count=8)
    for i in range(16):
        bad = i == 3 or 8 <= i < 11  # shard 0: sample 3; shard 1: 0..2, then good
        w.write({"__key__": f"b{i:04d}", **BAD["bad_image"]} if bad else _good(i))
    w.close()
    one = str(tmp_path / "s-000000.tar")
    keys, skipped = _run(one, n=1, shuffle=1, batch_size=7, mode=mode)
    assert keys == ["g0000", "g0001", "g0002", "g0004", "g0005", "g0006", "g0007"]
    assert skipped == {"bad_image": 1}
    w = ShardWriter(str(tmp_path), "t", max_count=8)
    for i in range(8, 16):
        w.write({"__key__": f"b{i:04d}", **BAD["bad_image"]})
    w.close()
    keys, skipped = _run(
        [str(tmp_path / "t-000000.tar"), str(tmp_path / "s-000001.tar")],
        n=2,
        shuffle=1,
        batch_size=5,
        mode=mode,
    )
    assert len(keys) == 10 and all(k.startswith("g") for k in keys)


def test_all_shards_empty_raises(tmp_path):
    for i in range(2):
        (tmp_path / f"e-{i:06d}.tar").write_bytes(b"")
    with pytest.raises(DataError, match="no readable sample"):
        _run(str(tmp_path / "e-{000000..000001}.tar"))


def _epoch(urls: str, rank: int, **kw):
    return build_pipeline(
        urls, batch_size=3, mode="epoch", rank=rank, world_size=2, num_workers=2,
        image_size=6, num_views=1, shuffle=2, seed=0, **kw,
    )  # fmt: skip


def test_a_slot_whose_own_shards_are_unreadable_reads_on_through_the_source(tmp_path):
    # 4 shards of 6 over 2 ranks x 2 workers: each slot's part of the epoch lies in one
    # shard; the slot whose shard is random bytes used to raise "no readable sample"
    w = ShardWriter(str(tmp_path), "s", max_count=6)
    for i in range(24):
        w.write(_good(i))
    w.close()
    bad = tmp_path / "s-000002.tar"
    bad.write_bytes(os.urandom(bad.stat().st_size))
    urls = str(tmp_path / "s-{000000..000003}.tar")
    readable = {f"g{i:04d}" for i in range(24) if not 12 <= i < 18}
    skipped = {}
    for rank in (0, 1):
        pl = _epoch(urls, rank)
        batches = list(pl)
        assert len(batches) == len(pl) == 4  # 24 samples // (2 ranks x 3)
        keys = [k for b in batches for k in b["__key__"]]
        assert len(keys) == 12 and set(keys) <= readable
        for kind, n in pl.skipped.items():
            skipped[kind] = skipped.get(kind, 0) + n
    # its slot reads its own part twice, then the others: the damage is counted once
    assert skipped == {"bad_tar": 1}
    # the position past the unreadable shard resumes exactly
    for rank in (0, 1):
        pl = _epoch(urls, rank)
        it = iter(pl)
        next(it)
        state = pl.state_dict()
        rest = [k for b in it for k in b["__key__"]]
        again = _epoch(urls, rank)
        again.load_state_dict(state)
        assert [k for b in again for k in b["__key__"]] == rest


def test_bad_documents_in_text_source(tmp_path):
    w = ShardWriter(str(tmp_path), "t", max_count=4)
    for i in range(8):
        w.write({"__key__": f"d{i}", "txt": b"\xff\xfe" if i == 2 else "some words " * 3})
    w.write({"__key__": "empty", "json": {}})
    w.close()
    pl = build_pipeline(
        sources=[Source(str(tmp_path / "t-{000000..000002}.tar"), kind="text")],
        batch_size=2,
        rank=0,
        world_size=1,
        tokenizer=StubTokenizer(),
        context_length=8,
        shuffle=1,
    )
    list(itertools.islice(pl, 12))
    assert pl.skipped.get("bad_text", 0) >= 1 and pl.skipped.get("missing_text", 0) >= 1


def test_16_bit_png_keeps_its_range():
    # torchvision decodes it to uint16 and PIL's RGB conversion clips it to white
    import io

    from PIL import Image

    from mmssl.data.decode import decode_image

    ramp = np.linspace(0, 65535, 400).astype(np.uint16).reshape(20, 20)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    img = decode_image(buf.getvalue())
    assert img.dtype == torch.uint8 and img.shape == (3, 20, 20)
    assert torch.equal(img[0], torch.from_numpy((ramp >> 8).astype(np.uint8)))


def test_damage_found_by_counting_samples_is_counted_once_on_rank_0(tmp_path):
    # no manifest: epoch mode counts each shard's samples first, and its segments stop at
    # the counted samples, so the stream never meets the damage again
    w = ShardWriter(str(tmp_path), "s", max_count=6)
    for i in range(24):
        w.write(_good(i))
    w.close()
    (tmp_path / "manifest.json").unlink()
    path = tmp_path / "s-000001.tar"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (tmp_path / "s-000003.tar").write_bytes(b"")
    urls = str(tmp_path / "s-{000000..000003}.tar")
    found = {"truncated_tar": 1, "empty_shard": 1}
    for rank, want in ((0, found), (1, {})):
        pl = build_pipeline(
            urls, batch_size=2, mode="epoch", rank=rank, world_size=2,
            image_size=6, num_views=1, shuffle=1,
        )  # fmt: skip
        for _ in range(2):  # two epochs: found once, not per epoch
            assert len(list(pl)) == len(pl)
            assert pl.skipped == want
        again = build_pipeline(
            urls, batch_size=2, mode="epoch", rank=rank, world_size=2,
            image_size=6, num_views=1, shuffle=1,
        )  # fmt: skip
        again.load_state_dict(pl.state_dict())
        assert again.skipped == want


def _tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A shard written member by member with tarfile (ShardWriter refuses repeated keys)."""
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _files(i: int, caption: str = "") -> dict[str, bytes]:
    arr = np.full((6, 6, 3), i % 256, np.uint8)
    return {"png": png_bytes(arr), "txt": (caption or f"good {i}").encode()}


def _manifest(tmp_path, counts: dict[str, int]) -> None:
    shards = [{"url": name, "count": n} for name, n in counts.items()]
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "shards": shards}))


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("manifest", [True, False])
def test_a_key_repeated_mid_shard_is_counted_once_a_pass(tmp_path, manifest, world):
    # a second sample under the key of the one before it, in the middle of a shard: the
    # stream meets it (the segment holding the sample after it counts it), so counting the
    # samples without a manifest must not report it a second time
    samples = [(f"g{i:04d}", _files(i)) for i in range(12)]
    _tar(tmp_path / "d-000000.tar", samples[:3] + [("g0002", _files(99, "dup"))] + samples[3:6])
    _tar(tmp_path / "d-000001.tar", samples[6:])
    if manifest:
        _manifest(tmp_path, {"d-000000.tar": 6, "d-000001.tar": 6})
    urls = str(tmp_path / "d-{000000..000001}.tar")
    loaders = [
        build_pipeline(
            urls,
            batch_size=4 // world,
            mode="epoch",
            rank=rank,
            world_size=world,
            image_size=6,
            num_views=0,
            shuffle=3,
        )  # fmt: skip
        for rank in range(world)
    ]
    for epoch in (1, 2):  # met once a pass, as a bad image is, with or without a manifest
        keys, captions, skipped = [], [], {}
        for pl in loaders:
            batches = list(pl)
            assert len(batches) == len(pl) == 3
            keys += [k for b in batches for k in b["__key__"]]
            captions += [c for b in batches for c in b["caption"]]
            for kind, n in pl.skipped.items():
                skipped[kind] = skipped.get(kind, 0) + n
        assert sorted(keys) == [k for k, _ in samples]  # every good sample once
        assert "dup" not in captions
        assert skipped == {"duplicate_key": epoch}


def test_a_key_repeated_mid_shard_of_a_text_source_is_counted_once(tmp_path):
    # text sources count their documents through the same reader before the stream
    doc = "abcdefghi"  # 9 characters + eos = one row of context_length + 1 = 10 tokens
    docs = [(f"d{i}", {"txt": doc.encode()}) for i in range(8)]
    _tar(tmp_path / "t-000000.tar", docs[:2] + [("d1", {"txt": b"repeated!"})] + docs[2:4])
    _tar(tmp_path / "t-000001.tar", docs[4:])
    pl = build_pipeline(
        str(tmp_path / "t-{000000..000001}.tar"), kind="text", batch_size=2, mode="epoch",
        rank=0, world_size=1, tokenizer=StubTokenizer(), context_length=9, shuffle=1,
    )  # fmt: skip
    batches = list(pl)
    assert len(batches) == len(pl) == 4  # every token of the 8 documents read
    assert pl.skipped == {"duplicate_key": 1}


@pytest.mark.parametrize("manifest", [True, False])
def test_a_shard_cut_mid_member_is_counted_once(tmp_path, manifest):
    # the damage ends the shard: without a manifest only counting the samples meets it (the
    # epoch's segments stop at the counted samples), with one the stream does
    samples = [(f"g{i:04d}", _files(i)) for i in range(12)]
    _tar(tmp_path / "c-000000.tar", samples[:6])
    _tar(tmp_path / "c-000001.tar", samples[6:])
    if manifest:  # written before the damage: it counts the shard whole
        _manifest(tmp_path, {"c-000000.tar": 6, "c-000001.tar": 6})
    path = tmp_path / "c-000001.tar"
    with tarfile.open(path) as tf:
        member = tf.getmember("g0009.png")
    data = path.read_bytes()
    path.write_bytes(data[: member.offset_data + member.size // 2])  # inside g0009.png
    pl = build_pipeline(
        str(tmp_path / "c-{000000..000001}.tar"), batch_size=8, mode="epoch", rank=0,
        world_size=1, image_size=6, num_views=0, shuffle=100,  # one window: the whole pass
    )  # fmt: skip
    keys = [k for b in pl for k in b["__key__"]]
    assert len(keys) == 8 and len(set(keys)) == 8
    assert set(keys) <= {f"g{i:04d}" for i in range(9)}  # g0009 is cut, g0010/11 lost
    assert pl.skipped == {"truncated_tar": 1}


def test_a_png_damaged_in_its_image_data_is_a_counted_bad_image_not_a_crash(tmp_path):
    """torchvision's PNG decoder dies with SIGSEGV on an IDAT that fails its CRC, and on
    image data that does not inflate to its rows under correct CRCs: both are checked
    first.  Run in a child process, so that a regression fails this test instead of
    killing the test session.  (An epoch's batches,
    counted with the damaged samples, are full: the stream reads on past its end to fill
    them, hence the set.)"""
    import subprocess
    import sys

    arr = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    w = ShardWriter(str(tmp_path), "s", max_count=20)
    for i in range(8):
        w.write(_good(i))
    for where in ("crc", "data"):
        w.write({"__key__": f"b{where}", "png": png_flipped(arr, where), "txt": "damaged"})
    for i, kind in enumerate(sorted(_CRASHERS)):  # every CRC correct
        png = png_with_data(5, 6, _CRASHERS[kind][0])
        w.write({"__key__": f"c{i}", "png": png, "txt": "damaged"})
    w.write({"__key__": "split", "png": _split_idat(), "txt": "damaged"})
    w.close()
    code = (
        "import itertools, json, sys\n"
        "from mmssl.data.pipeline import build_pipeline\n"
        f"pl = build_pipeline({str(tmp_path / 's-000000.tar')!r}, batch_size=2, mode='epoch',"
        " rank=0, world_size=1, image_size=6, num_views=1, shuffle=1)\n"
        "keys = sorted({k for b in pl for k in b['__key__']})\n"
        "print(json.dumps([keys, pl.skipped]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    keys, skipped = json.loads(done.stdout.splitlines()[-1])
    assert keys == [f"g{i:04d}" for i in range(8)]
    assert skipped == {"bad_image": 3 + len(_CRASHERS)}


def test_png_damage_names_the_chunk_and_passes_whole_files():
    from mmssl.data.decode import BadSample, decode_image, png_damage

    arr = np.arange(6 * 6 * 3, dtype=np.uint8).reshape(6, 6, 3)
    good = png_bytes(arr)
    assert png_damage(good) is None and png_damage(good + b"trailing bytes") is None
    assert torch.equal(decode_image(good), torch.from_numpy(arr).permute(2, 0, 1))
    assert png_damage(png_flipped(arr, "crc")) == "chunk b'IDAT' fails its CRC"
    assert png_damage(good[:-2]) == "chunk b'IEND' cut short"
    assert png_damage(good[:-6]).startswith("cut inside a chunk header")
    with pytest.raises(BadSample) as err:
        decode_image(png_flipped(arr, "data"))
    assert err.value.kind == "bad_image" and "IDAT" in str(err.value)


def _rows(arr: np.ndarray, filter_type: int = 0) -> bytes:
    """The inflated image data of an 8-bit (H, W, 3) image, one filter type on every row."""
    return b"".join(bytes([filter_type]) + row.tobytes() for row in arr)


_ARR = np.random.default_rng(3).integers(0, 256, (6, 5, 3), dtype=np.uint8)
_ROWS = _rows(_ARR)
_EXPECT = torch.from_numpy(_ARR).permute(2, 0, 1)
_Z = zlib.compress(_ROWS)
# image data under correct CRCs that made torchvision's decoder (libpng) die with SIGSEGV
_CRASHERS = {
    "broken deflate": (_Z[:2] + bytes(b ^ 0x5A for b in _Z[2:12]) + _Z[12:], "does not inflate"),
    "wrong Adler-32": (_Z[:-4] + b"\0\0\0\0", "incorrect data check"),
    "deflate cut short": (_Z[:-6], "cut short"),
    "no image data": (b"", "cut short"),
    "too few rows": (zlib.compress(_ROWS[: len(_ROWS) // 2]), "its rows take 96"),
    "filter type 7": (zlib.compress(_rows(_ARR, 7)), "row filter type 7"),
}


@pytest.mark.parametrize("fast", [True, False], ids=["numba", "libpng"])
@pytest.mark.parametrize("kind", sorted(_CRASHERS))
def test_png_damage_finds_image_data_that_libpng_would_die_on(kind, fast, monkeypatch):
    """Both decoders refuse it: mmssl.data.fastpng (numba), and the check before torchvision
    without numba (or for a format fastpng does not cover)."""
    from mmssl.data import decode
    from mmssl.data.decode import BadSample, decode_image, png_damage

    if not fast:
        monkeypatch.setattr(decode, "_fast_png", lambda: None)
    idat, words = _CRASHERS[kind]
    data = png_with_data(5, 6, idat)
    assert words in png_damage(data)
    with pytest.raises(BadSample) as err:
        decode_image(data)
    assert err.value.kind == "bad_image"


def test_png_image_data_check_passes_what_libpng_decodes():
    """Bytes after the rows (libpng warns and decodes), Adam7 interlacing (its empty passes
    have no rows), a filter type on each row: whole files, decoded as the array."""
    from mmssl.data.decode import decode_image, png_damage

    expect = torch.from_numpy(_ARR).permute(2, 0, 1)
    for data in (
        png_with_data(5, 6, zlib.compress(_ROWS + b"\0" * 40)),
        png_with_data(5, 6, zlib.compress(adam7_rows(_ARR)), interlace=1),
        png_bytes(_ARR),  # PIL's encoder picks its filters
    ):
        assert png_damage(data) is None
        assert torch.equal(decode_image(data), expect)
    tiny = np.full((1, 1, 3), 7, np.uint8)  # 6 of Adam7's 7 passes are empty
    assert png_damage(png_with_data(1, 1, zlib.compress(adam7_rows(tiny)), interlace=1)) is None
    short = zlib.compress(adam7_rows(_ARR)[:-3])
    assert "its rows take" in png_damage(png_with_data(5, 6, short, interlace=1))


def test_png_image_data_is_inflated_in_steps(monkeypatch):
    """A big image is inflated a piece at a time (memory stays bounded); a bad filter byte
    in a later piece is still found."""
    from mmssl.data import decode

    monkeypatch.setattr(decode, "_INFLATE_STEP", 7)
    monkeypatch.setattr(decode, "_FEED", 5)  # and fed a few compressed bytes at a time
    assert decode.png_damage(png_with_data(5, 6, _Z)) is None
    assert torch.equal(decode.decode_image(png_with_data(5, 6, _Z)), _EXPECT)
    bad = bytearray(_ROWS)
    bad[5 * 16] = 9  # the filter byte of row 5 (rows are 16 bytes)
    found = decode.png_damage(png_with_data(5, 6, zlib.compress(bytes(bad))))
    assert found == "row filter type 9 (0-4 exist)"


def _split_idat() -> bytes:
    """_ROWS as a PNG whose image data is two IDAT chunks with a text chunk between them."""
    from data_helpers import png_chunk

    whole = png_with_data(5, 6, b"")
    head = whole[: whole.index(b"IDAT") - 4]
    parts = [png_chunk(b"IDAT", _Z[:20]), png_chunk(b"tEXt", b"a\0b"), png_chunk(b"IDAT", _Z[20:])]
    return head + b"".join(parts) + png_chunk(b"IEND", b"")


@pytest.mark.parametrize("fast", [True, False], ids=["numba", "libpng"])
def test_idat_chunks_split_by_another_chunk_are_damage(fast, monkeypatch):
    """libpng stops reading image data at the first other chunk and then dies for want of
    rows (SIGSEGV in torchvision); the spec wants IDAT chunks consecutive."""
    from mmssl.data import decode

    if not fast:
        monkeypatch.setattr(decode, "_fast_png", lambda: None)
    assert (
        decode.png_damage(_split_idat()) == "IDAT chunks are not consecutive (b'tEXt' between them)"
    )
    with pytest.raises(decode.BadSample, match="not consecutive"):
        decode.decode_image(_split_idat())


def test_png_damage_walks_over_ancillary_chunks_and_the_size_limit_comes_first():
    """libpng decodes a PNG whose text chunk fails its CRC (it drops the chunk); a damaged
    image over the pixel limit is image_too_large, found from its header alone."""
    import io

    from PIL import Image, PngImagePlugin

    from mmssl.data.decode import BadSample, decode_image, png_damage

    arr = np.arange(6 * 6 * 3, dtype=np.uint8).reshape(6, 6, 3)
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "hello")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", pnginfo=info)
    data = bytearray(buf.getvalue())
    pos = data.index(b"tEXt") - 4
    n = int.from_bytes(data[pos : pos + 4], "big")
    data[pos + 8 + n] ^= 1  # the text chunk's CRC
    assert png_damage(bytes(data)) is None
    assert torch.equal(decode_image(bytes(data)), torch.from_numpy(arr).permute(2, 0, 1))
    with pytest.raises(BadSample) as err:
        decode_image(png_flipped(arr, "crc"), max_pixels=35)
    assert err.value.kind == "image_too_large"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_a_png_whose_first_chunk_is_not_ihdr_cannot_pass_the_size_limit():
    """The size was read from bytes 16..24 whatever chunk held them: a text chunk before IHDR
    saying 1 x 1 let a 200 x 200 image decode under max_pixels 1000 (libpng refuses a chunk
    before IHDR; PIL decodes it)."""
    from mmssl.data.decode import BadSample, decode_image

    w = h = 200
    z = zlib.compress((b"\0" + bytes(3 * w)) * h, 9)
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    rest = ihdr + _chunk(b"IDAT", z) + _chunk(b"IEND", b"")
    sig = b"\x89PNG\r\n\x1a\n"
    with pytest.raises(BadSample) as err:
        decode_image(sig + rest, max_pixels=1000)
    assert err.value.kind == "image_too_large"
    decoy = _chunk(b"tEXt", struct.pack(">II", 1, 1) + b"x\0y")
    with pytest.raises(BadSample) as err:
        decode_image(sig + decoy + rest, max_pixels=1000)
    assert err.value.kind == "bad_image" and "first chunk" in str(err.value)
    assert decode_image(sig + rest).shape == (3, h, w)


def _jpeg(size: tuple[int, int], **save: Any) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "JPEG", **save)
    return buf.getvalue()


def test_the_jpeg_size_is_the_frame_libjpeg_decodes():
    """A TEM marker (FF 01, no length) was given a length: the walk jumped into a comment
    holding a fake 16 x 16 frame header while libjpeg decoded the real 2000 x 2000 one, past
    max_pixels.  The walk now reads markers as libjpeg does."""
    from mmssl.data.decode import BadSample, _jpeg_size, decode_image

    src = _jpeg((16, 16), quality=90)
    segments, i = [], 2
    while src[i + 1] != 0xDA:  # up to the scan
        n = int.from_bytes(src[i + 2 : i + 4], "big")
        segments.append(src[i : i + 2 + n])
        i += 2 + n
    sof = next(s for s in segments if s[1] == 0xC0)
    real = sof[:5] + struct.pack(">HH", 2000, 2000) + sof[9:]
    out = bytearray(b"\xff\xd8\xff\x01") + real
    fake = b"\xff\xc0\x00\x11\x08" + struct.pack(">HH", 16, 16) + b"\x03" + bytes(9)
    pad = 2 + 2 + 0xFFC0 - (len(out) + 4)  # where a length read at the TEM marker lands
    payload = bytes(pad) + fake + bytes(16)
    out += b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload
    out += b"".join(s for s in segments if s[1] != 0xC0) + src[i:]
    assert _jpeg_size(bytes(out)) == (2000, 2000)
    with pytest.raises(BadSample) as err:
        decode_image(bytes(out), max_pixels=1000)
    assert err.value.kind == "image_too_large"
    # the sizes of ordinary files, as PIL reads them: baseline, progressive, with EXIF
    for save in ({}, {"progressive": True}, {"exif": b"Exif\0\0" + bytes(64)}):
        assert _jpeg_size(_jpeg((37, 23), **save)) == (23, 37), save


def test_a_bomb_in_a_format_pil_decodes_is_counted_as_too_large() -> None:
    """A GIF or BMP header claiming 20000 x 20000 pixels hit PIL's own limit at open and was
    counted as bad_image, where the same PNG or JPEG header is image_too_large."""
    import io

    from PIL import Image

    from mmssl.data.decode import BadSample, decode_image

    for fmt, at, pack in (("GIF", 6, "<HH"), ("BMP", 18, "<ii")):
        buf = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buf, fmt)
        data = bytearray(buf.getvalue())
        data[at : at + struct.calcsize(pack)] = struct.pack(pack, 20000, 20000)
        with pytest.raises(BadSample) as err:
            decode_image(bytes(data))
        assert err.value.kind == "image_too_large", (fmt, err.value)


def test_a_sample_with_an_image_in_another_format_names_its_members() -> None:
    """A `.avif` member was reported as a bare missing_image, the file never named."""
    from mmssl.data.decode import BadSample, find_image

    with pytest.raises(BadSample) as err:
        find_image({"__key__": "k", "avif": b"...", "txt": b"a cat"})
    assert err.value.kind == "missing_image"
    assert err.value.detail.endswith("member; it has: avif, txt")
