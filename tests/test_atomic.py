"""Two processes writing one output (a shard folder, an eval's --out): never a mixed or cut
file.  Each case starts real processes that meet at a barrier; without the locks and the
per-process temporary names, about one try in two went wrong (the concurrency tester's
counts), so a few tries each catch a regression."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from mmssl.data.errors import DataError
from mmssl.data.shards import ShardWriter

TRIES = 6


def _write_split(out: str, split: str, barrier, results) -> None:
    try:
        writer = ShardWriter(out, split, max_count=5)
        for i in range(40):
            writer.write({"__key__": f"{split}{i:04d}", "txt": f"{split} {i} " * 50})
        barrier.wait()
        writer.close()
        results.put((split, "ok"))
    except Exception as err:  # reported to the parent
        results.put((split, repr(err)))


def _both(target, *args) -> list:
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, barrier, results)) for a in args]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    return sorted(results.get(timeout=10) for _ in procs)


def test_writers_of_two_splits_into_one_folder_both_land_in_the_manifest(tmp_path: Path):
    """The manifest was read, merged and written under one fixed temporary name by both:
    a cut manifest.json, or one split missing, while both exited 0."""
    for i in range(TRIES):
        out = str(tmp_path / f"o{i}")
        assert _both(_write_split, (out, "train"), (out, "validation")) == [
            ("train", "ok"),
            ("validation", "ok"),
        ]
        manifest = json.loads((Path(out) / "manifest.json").read_text())
        assert sorted(manifest["splits"]) == ["train", "validation"]
        assert len(manifest["shards"]) == 16
        assert not [p.name for p in Path(out).iterdir() if ".partial" in p.name or ".tmp" in p.name]


def _hold_split(out: str, ready, done) -> None:
    writer = ShardWriter(out, "train")
    writer.write({"__key__": "a", "txt": "a"})
    ready.set()
    done.wait(30)
    writer.close()


def test_a_second_writer_of_a_split_is_refused_while_the_first_writes(tmp_path: Path):
    """Two writers of one split shared its .partial files and renamed each other's
    half-written shards into place (shards mixing both, the finished one exiting 0)."""
    ctx = mp.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    first = ctx.Process(target=_hold_split, args=(str(tmp_path), ready, done))
    first.start()
    try:
        assert ready.wait(30)
        with pytest.raises(DataError, match="another writer is writing split 'train'"):
            ShardWriter(str(tmp_path), "train")
        ShardWriter(str(tmp_path), "test").abort()  # another split may share the folder
    finally:
        done.set()
        first.join(30)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 1
    with ShardWriter(str(tmp_path), "train") as again:  # free once the first has closed
        again.write({"__key__": "b", "txt": "b"})


def _report(out: str, count: int, barrier, results) -> None:
    from mmssl.eval.report import write_report

    try:
        barrier.wait()
        for _ in range(20):
            write_report(
                out,
                "zeroshot",
                {"n": count},
                model="m",
                data="d",
                command=["x"],
                summary=f"summary {count}",
            )
        results.put((count, "ok"))
    except Exception as err:
        results.put((count, repr(err)))


def test_two_reports_into_one_out_leave_one_whole_report(tmp_path: Path):
    """write_report's fixed temporary name: FileNotFoundError for one, and a results.json
    of one report beside the summary.md of the other (or a cut results.json)."""
    for i in range(TRIES // 2):
        out = str(tmp_path / f"r{i}")
        assert _both(_report, (out, 10), (out, 300)) == [(10, "ok"), (300, "ok")]
        n = json.loads((Path(out) / "results.json").read_text())["results"]["n"]
        assert f"summary {n}" in (Path(out) / "summary.md").read_text()


def test_a_second_writer_of_a_split_in_the_same_process_is_refused_too(tmp_path: Path):
    """Record locks belong to the process: a second writer here was accepted (sharing the
    first one's .partial files), and its abort dropped the first one's lock."""
    first = ShardWriter(str(tmp_path), "train")
    first.write({"__key__": "a", "txt": "a"})
    with pytest.raises(DataError, match="another writer is writing split 'train'"):
        ShardWriter(str(tmp_path), "train")
    with ShardWriter(str(tmp_path), "manifest") as other:  # a split named like the lock
        other.write({"__key__": "m", "txt": "m"})
    first.close()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(manifest["splits"]) == ["manifest", "train"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
