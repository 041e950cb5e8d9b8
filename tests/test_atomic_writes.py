"""write_atomic and FileLock against their promises: fsync of the file and its folder, a
rename (a new inode: a reader of the old file keeps it whole), a temporary name per process,
and a nested release that keeps the lock from other processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

from mmssl import atomic
from mmssl.atomic import FileLock, temp_name, write_atomic


def test_write_atomic_fsyncs_the_file_and_its_directory(tmp_path: Path, monkeypatch):
    """The docstring promises fsync of the file and of the directory."""
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(atomic.os, "fsync", spy)
    target = tmp_path / "out.json"
    write_atomic(target, "hello")
    assert str(tmp_path) in synced, "directory not fsynced"
    # the data fd was the temp file (renamed afterwards): its name was the temp name
    assert any(s.startswith(str(tmp_path / ".out.json.tmp")) for s in synced), synced


def test_write_atomic_replaces_the_inode(tmp_path: Path):
    """A rename gives the path a new inode, so a reader with the old file open keeps
    the whole old content; copying into the old inode would rewrite it under the reader."""
    target = tmp_path / "out.txt"
    target.write_text("old content")
    with open(target) as reader:
        before = os.fstat(reader.fileno()).st_ino
        write_atomic(target, "new")
        assert os.stat(target).st_ino != before
        assert reader.read() == "old content"
    assert target.read_text() == "new"


def _temp_of(path, q):
    q.put(str(temp_name(Path(path))))


def test_temp_names_differ_between_processes(tmp_path: Path):
    """Two processes must never share a temporary file."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_temp_of, args=(str(tmp_path / "x"), q))
    p.start()
    p.join(20)
    assert q.get(timeout=5) != str(temp_name(tmp_path / "x"))


def test_a_nested_release_keeps_the_lock_from_other_processes(tmp_path: Path):
    """After an inner `with` block ends, the outer one still holds the lock."""
    path = tmp_path / ".lock"
    with FileLock(path):
        with FileLock(path):
            pass
        # a fresh interpreter: a forked child would inherit this process's in-memory hold
        code = (
            "import sys; from mmssl.atomic import FileLock, Busy\n"
            "try:\n FileLock(sys.argv[1]).acquire(wait=False); print('got it')\n"
            "except Busy:\n print('busy')"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=os.environ.copy(),
        )
        assert out.stdout.strip() == "busy", out
    assert not path.exists()
