"""Bad input is skipped and counted by kind, the stream continues; all-bad sources raise.

Bad samples, JSON fields and text documents; truncated, empty and unreadable shards, failing
pipes, keys repeated mid-shard: each counted once a pass, whatever the ranks and workers.
(Damaged and hostile image files are in test_data_bad_images.py.)"""

from __future__ import annotations

import io
import itertools
import json
import os
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from bad_input_helpers import _good
from data_helpers import StubTokenizer, png_bytes

from mmssl.data.decode import decode_fields, decode_text
from mmssl.data.errors import DataError
from mmssl.data.pipeline import Source, build_pipeline
from mmssl.data.shards import ShardWriter
from mmssl.eval.features import detect_fields


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
