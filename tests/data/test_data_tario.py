"""The tar reader (`iter_shard`) against the standard library's `tarfile` on the same bytes:
normal shards in GNU, pax and ustar formats, truncated at every block, damaged and empty."""

from __future__ import annotations

import io
import itertools
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds
from data_helpers import write_image_shards

from mmssl.data.errors import DataError, SkipCounter
from mmssl.data.tario import iter_shard, split_name
from mmssl.data.urls import check_urls, expand_urls


def _reference(path: str) -> tuple[list[tuple[str, dict[str, bytes]]], list[int]]:
    """tarfile's view: samples, and for each the byte offset from which it is complete.

    A sample is complete once the header (chain) of the next sample's first member is read,
    or, for the last one, the end-of-archive block.
    """
    samples: list[tuple[str, dict[str, bytes]]] = []
    starts: list[int] = []  # offset_data of each sample's first member
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            k, ext = split_name(m.name)
            base = os.path.basename(m.name)
            if not m.isfile() or "." not in base or base.startswith("."):
                continue
            if not samples or samples[-1][0] != k:
                samples.append((k, {}))
                starts.append(m.offset_data)
            samples[-1][1][ext] = tf.extractfile(m).read()  # type: ignore[union-attr]
        end = tf.offset + 512  # tarfile stops at the first end-of-archive block
    return samples, starts[1:] + [end]


def _read(url: str, skip: int = 0) -> tuple[list[tuple[str, dict[str, bytes]]], dict[str, int]]:
    counter = SkipCounter()
    return list(iter_shard(url, counter, skip=skip)), counter.counts


def _odd_archive(path: str, fmt: int) -> None:
    """Long and non-ASCII names, directories, links, hidden and extension-less files,
    members of 0 and of non-block-multiple sizes, several members per key."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w", format=fmt) as tf:

        def add(name: str, data: bytes | None = None, kind: bytes = tarfile.REGTYPE) -> None:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "elsewhere"
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)

        add("top", kind=tarfile.DIRTYPE)
        for i in range(7):
            stem = f"top/{'deep/' * (i * 9)}s{i:03d}" if i % 2 else f"top/s{i:03d}é"
            add(f"{stem}.jpg", rng.bytes(int(rng.integers(0, 2000))))
            add(f"{stem}.txt", f"caption {i}".encode())
            if i == 3:
                add(f"{stem}.link", kind=tarfile.SYMTYPE)
                add("top/.hidden.txt", b"not a sample")
                add("top/noext", b"not a sample either")
            add(f"{stem}.seg.PNG", bytes(512 * (i % 3)))


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("tario")
    paths = expand_urls(write_image_shards(str(d / "w"), shards=1, per_shard=9))
    for name, fmt in [("gnu", tarfile.GNU_FORMAT), ("pax", tarfile.PAX_FORMAT)]:
        _odd_archive(str(d / f"{name}.tar"), fmt)
        paths.append(str(d / f"{name}.tar"))
    with tarfile.open(d / "ustar.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(3):  # 100 < len(name) <= 255: the name goes into the ustar prefix
            info = tarfile.TarInfo(f"{'d' * 60}/{'e' * 50}/k{i}.txt")
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
    paths.append(str(d / "ustar.tar"))
    return paths


def test_agrees_with_tarfile(archives):
    for path in archives:
        ref, _ = _reference(path)
        got, skipped = _read(path)
        assert got == ref, path
        assert skipped == {}
        assert len(ref) >= 3
        for skip in (1, len(ref) - 1, len(ref) + 2):
            assert _read(path, skip)[0] == ref[skip:]
        assert _read(f"pipe:cat {path}")[0] == ref


MAGIC = {"gz": b"\x1f\x8b", "bz2": b"BZh", "xz": b"\xfd7zXZ\x00"}


def _gzipped_by_tarfile(src: str, dst: str, how: str = "gz") -> str:
    """`src`'s members written again by tarfile as a compressed tar (mode w:gz, w:bz2, w:xz)."""
    with tarfile.open(src) as old, tarfile.open(dst, f"w:{how}", format=old.format) as new:
        for m in old.getmembers():
            new.addfile(m, old.extractfile(m) if m.isfile() else None)
    with open(dst, "rb") as f:
        assert f.read(len(MAGIC[how])) == MAGIC[how]
    return dst


@pytest.mark.parametrize(
    "name,how",
    [
        ("x.tar.gz", "gz"),
        ("x.tgz", "gz"),
        ("gzip-inside.tar", "gz"),
        ("x.tar.bz2", "bz2"),
        ("x.tar.xz", "xz"),
    ],
)
def test_a_compressed_shard_reads_as_its_uncompressed_tar(archives, tmp_path, name, how):
    # webdataset (tarfile's "r|*") reads gzip, bzip2 and xz shards; read as plain tars they
    # were one bad_tar each
    for path in archives:
        ref = _read(path)
        assert ref[1] == {} and len(ref[0]) >= 3
        gz = _gzipped_by_tarfile(path, str(tmp_path / name), how)
        assert _read(gz) == ref, path
        for skip in (1, len(ref[0]) - 1, len(ref[0]) + 2):  # resume skips samples
            assert _read(gz, skip)[0] == ref[0][skip:]
        assert _read(f"pipe:cat {gz}") == ref


def test_a_gzip_pipe_whose_first_write_is_one_byte_is_read(archives, tmp_path):
    # a buffered pipe's peek returned that 1 byte: not the gzip magic, and the shard was
    # one bad_tar; a plain tar written the same way reads as before
    ref = _read(archives[0])
    gz = _gzipped_by_tarfile(archives[0], str(tmp_path / "x.tar.gz"))
    for path in (gz, archives[0]):
        slow = f"pipe:(head -c 1 {path}; sleep 0.2; tail -c +2 {path})"
        assert _read(slow) == ref, path
        assert _read(slow, 1)[0] == ref[0][1:]


def test_a_zstd_shard_is_a_bad_tar_that_says_how_to_read_it(tmp_path):
    (tmp_path / "x.tar.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(2000))

    class Recorder(SkipCounter):
        def add(self, kind: str, where: str, detail: str = "") -> None:
            self.details = [*getattr(self, "details", []), detail]
            super().add(kind, where, detail)

    for url in (str(tmp_path / "x.tar.zst"), f"pipe:cat {tmp_path / 'x.tar.zst'}"):
        counter = Recorder()
        assert list(iter_shard(url, counter)) == []
        assert counter.counts == {"bad_tar": 1}  # the stopped command's broken pipe is not
        assert "zstd-compressed" in counter.details[0] and "pipe:zstd -dc" in counter.details[0]


@pytest.mark.parametrize("how", ["gz", "bz2", "xz"])
def test_a_truncated_compressed_shard_keeps_complete_samples_and_is_counted(
    archives, tmp_path, how
):
    ref, _ = _read(archives[0])
    data = open(_gzipped_by_tarfile(archives[0], str(tmp_path / "x.tar.gz"), how), "rb").read()
    for cut in (1, 5, 30, len(data) // 3, len(data) // 2, len(data) * 3 // 4):  # 30: < 1 block
        (tmp_path / "cut.tar.gz").write_bytes(data[:cut])
        got, skipped = _read(str(tmp_path / "cut.tar.gz"))
        assert got == ref[: len(got)], cut
        # bzip2 decompresses whole 900 kB blocks: this one-block shard cut gives no tar byte
        first = cut <= 30 or how == "bz2"
        assert len(skipped) == 1 and skipped.get("bad_tar" if first else "truncated_tar"), cut
    if how != "bz2":  # the last cut is inside the data: some samples were read
        assert 0 < len(got) < len(ref)


def test_truncated_at_every_block_keeps_exactly_the_complete_samples(archives, tmp_path):
    for path in archives:
        data = open(path, "rb").read()
        ref, complete_at = _reference(path)
        cuts = sorted(set(range(512, complete_at[-1] + 1, 512)) | {700, 1500, len(data) - 1})
        for cut in cuts:
            part = tmp_path / "cut.tar"
            part.write_bytes(data[:cut])
            j = sum(1 for c in complete_at if c <= cut)
            got, skipped = _read(str(part))
            assert got == ref[:j], (path, cut)
            if cut < complete_at[-1]:
                kind = "bad_tar" if cut < 512 else "truncated_tar"
                assert skipped == {kind: 1}, (path, cut)
            else:
                assert skipped == {}
            if j >= 2:  # skipped samples are seeked over, the damage is still found
                assert _read(str(part), skip=1) == (ref[1:j], skipped)


def test_damaged_header_ends_the_shard_and_is_counted(archives, tmp_path):
    path = archives[0]
    ref, complete_at = _reference(path)
    data = bytearray(open(path, "rb").read())
    header = complete_at[2] - 512  # first header of sample 3
    data[header + 10] ^= 0xFF  # the checksum no longer matches
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    got, skipped = _read(str(bad))
    # tarfile stops here silently; the reader counts it and drops the unfinished sample
    assert got == ref[:2] and skipped == {"truncated_tar": 1}


@pytest.mark.parametrize("bad_member", ["b.txt", "a.json"])
def test_bad_pax_size_ends_the_shard_and_keeps_complete_samples(tmp_path, bad_member):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name in ("a.txt", "a.json", "b.txt", "c.txt"):
            info = tarfile.TarInfo(name)
            info.size = 5
            if name == bad_member:
                info.pax_headers = {"sizf": "abc"}  # same length as the bad record below
            t.addfile(info, io.BytesIO(b"hello"))
    path = tmp_path / "pax.tar"
    path.write_bytes(buf.getvalue().replace(b"sizf=abc", b"size=abc"))
    got, skipped = _read(str(path))
    # damage in b's header leaves a complete; damage inside a leaves nothing
    assert [k for k, _ in got] == (["a"] if bad_member == "b.txt" else [])
    assert skipped == {"truncated_tar": 1}


@pytest.mark.parametrize("how", ["base256", "pax"])
@pytest.mark.parametrize("compressed", [False, True])
def test_a_member_declaring_a_huge_size_is_a_truncated_tar(tmp_path, how, compressed):
    """A 3 KB file whose header says 1 TiB (or a pax size of 10**30) read that many bytes
    in one call: MemoryError (OverflowError) ended the run instead of a counted skip."""
    import gzip

    def member(name: str, data: bytes, size: int | None = None) -> bytes:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        if how == "pax" and size is not None:
            info.pax_headers = {"size": str(size)}
        block = bytearray(info.tobuf(tarfile.PAX_FORMAT if how == "pax" else tarfile.GNU_FORMAT))
        if how == "base256" and size is not None:  # the size field in GNU's base-256
            block[124:136] = b"\x80" + size.to_bytes(11, "big")
            block[148:156] = b"        "
            block[148:156] = b"%06o\0 " % sum(block)
        return bytes(block) + data + bytes(-len(data) % 512)

    huge = 1 << 40 if how == "base256" else 10**30
    data = member("a.txt", b"hello") + member("b.txt", b"x" * 512, huge) + bytes(1024)
    path = tmp_path / ("huge.tar.gz" if compressed else "huge.tar")
    path.write_bytes(gzip.compress(data) if compressed else data)
    got, skipped = _read(str(path))
    assert [k for k, _ in got] == ["a"] and skipped == {"truncated_tar": 1}


def test_empty_random_and_end_blocks_only(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    assert _read(str(tmp_path / "empty.tar")) == ([], {"empty_shard": 1})
    (tmp_path / "zeros.tar").write_bytes(bytes(10240))
    assert _read(str(tmp_path / "zeros.tar")) == ([], {"empty_shard": 1})
    with tarfile.open(tmp_path / "none.tar", "w"):
        pass
    assert _read(str(tmp_path / "none.tar")) == ([], {"empty_shard": 1})
    (tmp_path / "noise.tar").write_bytes(np.random.default_rng(0).bytes(4096))
    assert _read(str(tmp_path / "noise.tar")) == ([], {"bad_tar": 1})
    assert _read(str(tmp_path / "missing.tar"))[1] == {"missing_shard": 1}


def test_a_repeated_key_is_skipped_and_counted_not_merged(tmp_path):
    # other tools' shards may hold two samples under one key: merged, the first's files
    # would be replaced by the second's (plain webdataset raises on them)
    path = str(tmp_path / "dup.tar")
    with tarfile.open(path, "w") as tf:
        for name, data in [
            ("a.jpg", b"1"), ("a.txt", b"one"),
            ("b.jpg", b"2"), ("b.txt", b"two"),
            ("b.jpg", b"3"), ("b.txt", b"three"),  # b again
            ("b.jpg", b"4"),  # and a third time
            ("c.jpg", b"5"),
        ]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    got, skipped = _read(path)
    assert got == [("a", {"jpg": b"1", "txt": b"one"}), ("b", {"jpg": b"2", "txt": b"two"}),
                   ("c", {"jpg": b"5"})]  # fmt: skip
    assert skipped == {"duplicate_key": 2}
    for skip in range(4):  # positions count the kept samples only; skips before are not recounted
        got_from, counted = _read(path, skip)
        assert got_from == got[skip:]
        assert counted == ({"duplicate_key": 2} if skip <= 2 else {})


def test_hidden_files_are_not_samples(tmp_path):
    # macOS tar adds an AppleDouble `._NAME` before each file; webdataset skips them, as the
    # reader means to (the key before a leading dot is empty, so a key check never saw one)
    path = str(tmp_path / "mac.tar")
    with tarfile.open(path, "w") as tf:
        for name, data in [
            ("._a.jpg", b"apple"), ("a.jpg", b"1"), ("a.txt", b"one"),
            ("._b.jpg", b"apple"), ("b.jpg", b"2"),
            ("d/._c.jpg", b"apple"), ("d/c.jpg", b"3"), ("d/.c.txt", b"hidden"),
        ]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    got, skipped = _read(path)
    assert got == [("a", {"jpg": b"1", "txt": b"one"}), ("b", {"jpg": b"2"}),
                   ("d/c", {"jpg": b"3"})]  # fmt: skip
    assert skipped == {}
    import webdataset as wds

    # at the top level (inside a folder webdataset takes `d/` for the key)
    ref = wds.WebDataset(path, shardshuffle=False)
    top = [(s["__key__"], s["jpg"]) for s in itertools.islice(ref, 2)]
    assert top == [(k, f["jpg"]) for k, f in got[:2]]


def test_pipe_shard_with_long_record_padding_is_read_clean(archives, tmp_path):
    # `tar -b 512` pads the archive to 256 KiB records: more than a pipe holds once the
    # reader has met the end-of-archive block, so closing the pipe then broke the command
    # (exit 141) and a whole shard was counted as a pipe_error (an error in evaluation)
    path = str(tmp_path / "b512.tar")
    with open(archives[0], "rb") as src, open(path, "wb") as dst:
        data = src.read()
        dst.write(data + bytes(-len(data) % (512 * 512)))
    ref, _ = _reference(path)
    assert len(ref) == 9
    assert _read(f"pipe:cat {path}") == (ref, {})
    assert _read(f"pipe:cat {path}; exit 3")[1] == {"pipe_error": 1}  # a real failure still counts
    got, skipped = _read(f"pipe:cat {path} {path}")  # a second archive after the first: ignored
    assert (got, skipped) == (ref, {})


def test_empty_extension_is_a_field_named_empty_as_in_webdataset(tmp_path) -> None:
    # webdataset's base_plus_ext splits `a.` into key `a` and field "": a sample, not a skip
    path = str(tmp_path / "empty-ext.tar")
    members = [("a.", b"0"), ("a.txt", b"1"), ("b.jpg", b"2"), ("c", b"3"), ("d.", b"4")]
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    want = [
        (s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
        for s in wds.WebDataset(path, shardshuffle=False)
    ]
    assert want == [("a", {"": b"0", "txt": b"1"}), ("b", {"jpg": b"2"}), ("d", {"": b"4"})]
    assert _read(path) == (want, {})


def test_double_colon_of_an_address_in_a_command_does_not_split_it(archives) -> None:
    # webdataset splits on every `::`: these commands came out cut into pieces
    shard = archives[0]
    url6 = "pipe:curl -s http://[::1]:8000/a-{0..1}.tar"
    assert expand_urls(url6) == [
        "pipe:curl -s http://[::1]:8000/a-0.tar",
        "pipe:curl -s http://[::1]:8000/a-1.tar",
    ]
    bare = f"pipe:echo ::1 > /dev/null; cat {shard}"  # an unbracketed address (ssh ::1 ...)
    assert expand_urls(bare) == [bare]
    # `::` still joins patterns and commands, and a list of them
    joined = f"{shard} :: pipe:cat {shard}::{bare}::pipe:curl http://[::1]/b.tar"
    assert expand_urls([joined, "c-{0..1}.tar"]) == [
        shard,
        f"pipe:cat {shard}",
        bare,
        "pipe:curl http://[::1]/b.tar",
        "c-0.tar",
        "c-1.tar",
    ]
    assert expand_urls("http://[::1]:8000/a.tar::b.tar") == ["http://[::1]:8000/a.tar", "b.tar"]
    (url,) = expand_urls(f"pipe:test -n '[::1]' && cat {shard}")
    assert _read(url) == _read(shard)


def test_a_glob_that_matches_nothing_says_globs_are_not_expanded(archives, tmp_path) -> None:
    # the shards exist, but `*` is not expanded: "matches no file" alone misled
    folder = os.path.dirname(archives[0])
    for pattern in [f"{folder}/*.tar", f"{folder}/a-?.tar", f"{folder}/[ab].tar"]:
        with pytest.raises(DataError, match=r"matches no file; mmssl expands \{a\.\.b\} brace"):
            check_urls(pattern, expand_urls(pattern))
    with pytest.raises(DataError, match=r"do not exist; mmssl expands .* not \*, \? or \[\]"):
        check_urls([archives[0], f"{folder}/*.tar"], [archives[0], f"{folder}/*.tar"])
    with pytest.raises(DataError, match=r"matches no file \(first: "):  # no glob, no hint
        check_urls(str(tmp_path / "a-{0..1}.tar"), expand_urls(str(tmp_path / "a-{0..1}.tar")))


def test_a_plain_tar_whose_first_key_begins_like_bzip2_is_read(tmp_path):
    # "BZh" alone took it for bzip2 (tarfile also checks the block magic): the shard was lost
    path = tmp_path / "bzh.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("BZh1.txt", "BZh1.jpg", "BZh2.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"ok"))
    assert _read(str(path)) == (
        [("BZh1", {"txt": b"ok", "jpg": b"ok"}), ("BZh2", {"txt": b"ok"})],
        {},
    )


def test_compressed_damage_at_the_start_is_a_bad_tar_named_by_its_format(tmp_path):
    for name, head in (
        ("x.tar.gz", b"\x1f\x8b\x08\x00"),
        ("x.tar.bz2", b"BZh91AY&SY"),
        ("x.tar.xz", b"\xfd7zXZ\x00"),
    ):
        (tmp_path / name).write_bytes(head + bytes(range(256)) * 4)
        counter = SkipCounter()
        assert list(iter_shard(str(tmp_path / name), counter)) == []
        assert counter.counts == {"bad_tar": 1}, name  # bzip2's OSError was a truncated_tar


def test_damage_mid_tar_through_a_pipe_is_counted_as_damage(archives, tmp_path):
    # the reader stops at the damage; the command then dies on the broken pipe (141), and
    # the shard was counted as a pipe_error
    data = open(archives[0], "rb").read()
    path = tmp_path / "cut.tar"
    path.write_bytes(data[: len(data) // 2] + b"\xff" * 512 + bytes(1 << 20))
    _, direct = _read(str(path))
    _, piped = _read(f"pipe:cat {path}")
    assert set(direct) == set(piped) == {"truncated_tar"} or set(direct) == set(piped) == {
        "bad_tar"
    }


def test_damage_before_a_readers_part_is_counted_by_the_part_that_holds_it(archives, tmp_path):
    # a slot whose part of a shard starts after the damage read through it and counted it too
    data = open(archives[0], "rb").read()
    ref, complete_at = _reference(archives[0])
    cut = complete_at[1] + 700  # inside the third sample
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    got, skipped = _read(str(tmp_path / "cut.tar"))
    assert got == ref[:2] and skipped == {"truncated_tar": 1}  # the part from sample 0
    got, skipped = _read(str(tmp_path / "cut.tar"), skip=5)  # a part from sample 5
    assert got == [] and skipped == {}
