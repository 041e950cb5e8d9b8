"""Writing outputs that other processes read or write too: whole files (`write_atomic`,
`temp_name`) and advisory locks between writers of one output (`FileLock`: a shard folder's
split and manifest, an evaluation's --out, an export folder).

A POSIX record lock (`fcntl.lockf`) on a hidden, empty lock file beside the output, removed
again on release: the kernel drops the lock when its process ends, however it ends (a
killed holder leaves only the empty file), and NFS supports it.  Two writers
then take turns (`wait=True`) or the second is refused (`wait=False`), instead of writing
into each other's temporary files.  A file system without locks gets a warning and the
write goes on unlocked.  (Training runs have their own lock: `mmssl.train.run_lock`.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType

_log = logging.getLogger(__name__)


class Busy(Exception):
    """Another process holds the lock (raised by `FileLock.acquire(wait=False)`)."""


class FileLock:
    """The lock on `path` (made if missing, never written); `with FileLock(p):` waits for it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, wait: bool = True) -> None:
        """Take the lock, waiting for another holder if `wait`, else `Busy`."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise Busy(str(self.path)) from None
                _log.warning("%s: no lock on this file system (%s); unlocked", self.path, err)
            if self._current(fd):
                self.fd = fd
                return
            os.close(fd)  # locked a file its holder's release unlinked meanwhile: again

    def _current(self, fd: int) -> bool:
        """Whether `fd` is the file at `path` (not one a release unlinked)."""
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Drop the lock and remove its file (a waiter that locked the removed file sees that
        and takes a new one), so that the output holds no lock files."""
        if self.fd is not None:
            if self._current(self.fd):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def temp_name(path: Path) -> Path:
    """A hidden sibling of `path` no other process writes (its pid): same file system, so
    `os.replace` onto `path` is atomic."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and rename, fsynced (file and directory),
    so a kill leaves the old file or the new one, never part of one."""
    tmp = temp_name(path)  # this process's: two writers never share one (a report, an export)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
