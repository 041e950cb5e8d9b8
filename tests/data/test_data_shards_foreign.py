"""What `mmssl shards` finds in its output folder before it writes: shards of its split's
names that the manifest does not list (another tool's) are refused, not replaced in part;
the `.partial` files a killed writer of the split left are deleted.  And a shard pattern
that does not brace-expand is a DataError wherever the library expands it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmssl.data.errors import DataError
from mmssl.data.pipeline import build_pipeline
from mmssl.data.shards import ShardWriter


def _write(out: Path, split: str, n: int) -> None:
    writer = ShardWriter(str(out), split, max_count=1)
    for i in range(n):
        writer.write({"__key__": f"{split}{i}", "txt": b"a caption"})
    writer.close()


def test_a_shard_no_manifest_lists_is_refused_not_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for i in (1, 2):  # as webdataset's ShardWriter names them, with no manifest
        (out / f"train-{i:06d}.tar").write_bytes(b"another tool's shard")
    with pytest.raises(DataError, match=r"train-000001\.tar is not in its manifest\.json"):
        _write(out, "train", 3)  # writes train-000000, then would replace train-000001
    names = sorted(os.listdir(out))
    assert [n for n in names if "train" in n] == ["train-000001.tar", "train-000002.tar"], names
    assert all(
        (out / f"train-00000{i}.tar").read_bytes() == b"another tool's shard" for i in (1, 2)
    )
    _write(out, "val", 2)  # another split's names are free
    _write(out, "val", 1)  # and a rerun over its own listed shards goes on
    assert sorted(n for n in os.listdir(out) if n.startswith("val")) == ["val-000000.tar"]
    _write(out, "train", 1)  # the train lock was let go; train-000000 was free


def test_a_killed_writers_partial_files_are_deleted_by_the_next_writer(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write(out, "train", 2)
    left = [f".train-{i:06d}.tar.partial" for i in range(2, 6)] + [".val-000000.tar.partial"]
    for name in left:  # what a SIGKILL among the writes leaves
        (out / name).write_bytes(b"half a shard")
    (out / ".train-000009.tar").write_bytes(b"not a partial file")
    _write(out, "train", 1)
    names = sorted(os.listdir(out))
    assert not [n for n in names if n.startswith(".train") and n.endswith(".partial")], names
    assert ".val-000000.tar.partial" in names and ".train-000009.tar" in names


def test_an_unbalanced_brace_pattern_is_a_data_error(tmp_path: Path) -> None:
    pattern = str(tmp_path / "train-{000000..000009.tar")
    with pytest.raises(DataError, match="cannot be brace-expanded"):
        build_pipeline(pattern, batch_size=2, kind="image")
