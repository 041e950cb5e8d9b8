"""Tar headers that would make the reader loop for ever without their checks: a negative
(GNU base-256) member size, which seeks back onto the same header, and a pax record whose
length does not cover its own `LEN ` prefix.  Each is a counted damaged shard.  The
timeout marks (pytest-timeout) fail a reader that loops instead of raising."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from mmssl.data.errors import SkipCounter
from mmssl.data.tario import iter_shard


def _read(url: str) -> tuple[list[str], dict[str, int]]:
    counter = SkipCounter()
    keys = [k for k, _ in iter_shard(url, counter)]
    return keys, counter.counts


def _negative_size_tar(path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in [("a.txt", b"first"), ("README", b"x" * 10), ("b.txt", b"second")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = bytearray(buf.getvalue())
    h = 1024  # README's header: after a.txt's header and its one data block
    assert raw[h : h + 6] == b"README"
    # the size field (12 bytes at 124) in GNU base-256: -512; then the header checksum again
    raw[h + 124 : h + 136] = b"\xff" + (-512 % (1 << 88)).to_bytes(11, "big")
    raw[h + 148 : h + 156] = b"        "
    raw[h + 148 : h + 156] = b"%06o\x00 " % sum(raw[h : h + 512])
    path.write_bytes(bytes(raw))


@pytest.mark.timeout(30)
def test_a_negative_member_size_is_damage_not_an_endless_read(tmp_path: Path) -> None:
    _negative_size_tar(tmp_path / "neg.tar")
    keys, counts = _read(str(tmp_path / "neg.tar"))
    assert "b" not in keys  # the reader stopped at the damaged header
    assert counts.get("truncated_tar", 0) + counts.get("bad_tar", 0) == 1


def _pax_tar(path: Path, pax_body: bytes) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        first = tarfile.TarInfo("a.txt")
        first.size = 5
        tar.addfile(first, io.BytesIO(b"first"))
        pax = tarfile.TarInfo("PaxHeader")
        pax.type = tarfile.XHDTYPE
        pax.size = len(pax_body)
        tar.addfile(pax, io.BytesIO(pax_body))
        second = tarfile.TarInfo("b.txt")
        second.size = 6
        tar.addfile(second, io.BytesIO(b"second"))
    path.write_bytes(buf.getvalue())


@pytest.mark.timeout(30)
def test_a_good_pax_record_renames_the_next_member(tmp_path: Path) -> None:
    _pax_tar(tmp_path / "ok.tar", b"14 path=c.txt\n")
    assert _read(str(tmp_path / "ok.tar")) == (["a", "c"], {})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("body", [b"0 path=c.txt\n", b"2 path=c.txt\n"])
def test_a_pax_record_shorter_than_its_prefix_is_damage(tmp_path: Path, body: bytes) -> None:
    _pax_tar(tmp_path / "bad.tar", body)
    keys, counts = _read(str(tmp_path / "bad.tar"))
    assert "c" not in keys and "b" not in keys
    assert counts.get("truncated_tar", 0) + counts.get("bad_tar", 0) == 1


def test_a_signed_header_checksum_is_accepted(tmp_path):
    """Old tars write the header checksum over signed bytes; with a name beyond ASCII it
    differs from the unsigned sum, and both are valid (POSIX readers accept either)."""
    import io
    import tarfile

    from mmssl.data.errors import SkipCounter
    from mmssl.data.tario import iter_shard

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("z\u00e9ro.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    data = bytearray(buf.getvalue())
    header = data[:512]
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + b" " * 8 + header[156:])
    assert signed != sum(header[:148]) + 256 + sum(header[156:])  # the name has high bytes
    data[148:156] = b"%06o\0 " % signed
    path = tmp_path / "s.tar"
    path.write_bytes(bytes(data))
    counter = SkipCounter()
    assert [k for k, _ in iter_shard(str(path), counter)] == ["z\u00e9ro"]
    assert not counter.counts


def _sparse_tar(tmp_path: Path, fmt: str, regions: int) -> str:
    """GNU tar -S of 0.txt, 1.jpg (sparse: `regions` one-byte runs between holes), 1.txt, 2.txt."""
    import subprocess

    src = tmp_path / f"src{fmt}{regions}"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.txt").write_text(f"c{i}")
    with open(src / "1.jpg", "wb") as f:
        for r in range(regions):
            f.seek(64 * 1024 * (r + 1))
            f.write(b"x")
    out = tmp_path / f"{fmt}{regions}.tar"
    cmd = ["tar", "-S", f"--format={fmt}", "--sort=name", "-cf", str(out), "."]
    subprocess.run(cmd, cwd=src, check=True)
    return str(out)


@pytest.mark.parametrize("fmt", ["gnu", "oldgnu", "posix"])
@pytest.mark.parametrize("regions", [1, 30])  # 30: old GNU's map goes on in extension blocks
def test_a_sparse_member_drops_its_sample_counted_and_keeps_the_others(tmp_path, fmt, regions):
    """GNU tar -S: type S (old GNU; its map beyond 4 runs in extension blocks) ended the shard
    as truncated_tar, losing the complete sample before it and every one after; the pax sparse
    format was read as a member named ./GNUSparseFile.NNN/1.jpg holding the sparse map.  The
    sample with the sparse file is now left out and counted; the others are tarfile's."""
    url = _sparse_tar(tmp_path, fmt, regions)
    counter = SkipCounter()
    got = dict(iter_shard(url, counter))
    assert sorted(got) == ["./0", "./2"] and counter.counts == {"sparse_member": 1}
    with tarfile.open(url) as tar:
        for key in got:
            assert got[key] == {"txt": tar.extractfile(f"{key}.txt").read()}
        assert tar.getmember("./1.jpg").issparse()  # what the test builds is sparse


def test_evaluation_refuses_a_sparse_member_naming_it(tmp_path):
    """Evaluation scores whole test sets: a sample left out is an error, which said "only its
    first 2 sample(s) could be read" after the reader had gone on to the end."""
    from mmssl.data.errors import DataError
    from mmssl.eval.data import iter_raw

    url = _sparse_tar(tmp_path, "gnu", 1)
    with pytest.raises(
        DataError, match=r"holds a GNU sparse file \(\./1\.jpg: tar -S sparse file\)"
    ):
        list(iter_raw([url]))


def test_a_resume_past_the_sparse_sample_does_not_count_it_again(tmp_path):
    """Skipped samples (a resume's) are counted by the reader of their part only: a sparse
    sample before the saved position is not counted again, one after it is."""
    url = _sparse_tar(tmp_path, "gnu", 1)  # ./0, ./1 (sparse), ./2
    for skip, keys, counts in [
        (0, ["./0", "./2"], {"sparse_member": 1}),
        (1, ["./2"], {"sparse_member": 1}),
        (2, [], {}),
    ]:
        counter = SkipCounter()
        assert [k for k, _ in iter_shard(url, counter, skip=skip)] == keys
        assert counter.counts == counts, skip


def test_damage_after_a_sparse_member_is_what_evaluation_reports(tmp_path):
    """Damage that ends the shard outranks the one sample a sparse member left out."""
    from mmssl.data.errors import DataError
    from mmssl.eval.data import iter_raw

    data = Path(_sparse_tar(tmp_path, "gnu", 1)).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: data.rfind(b"./2.txt") + 100])  # inside the last member's header
    with pytest.raises(DataError, match="is damaged"):
        list(iter_raw([str(cut)]))
