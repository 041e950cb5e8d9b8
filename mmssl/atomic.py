"""Writing outputs that other processes read or write too: whole files (`write_atomic`,
`temp_name`), files read together (`replace_together`) and advisory locks between writers
of one output (`FileLock`: a shard folder's split and manifest, an evaluation's --out, an
export folder).

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
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

_log = logging.getLogger(__name__)


class Busy(Exception):
    """Another process holds the lock (raised by `FileLock.acquire(wait=False)`)."""


class FileLock:
    """The lock on `path` (made if missing, never written); `with FileLock(p):` waits for it.

    Between processes, a record lock.  Within one process (record locks belong to the
    process: a second descriptor of it would share, and its close drop, the first one's) the
    threads take turns on a lock of this process per path, which one thread may take again
    (nested `with` blocks); `acquire(wait=False)` is refused when another FileLock of this
    process holds the path."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._mine: _Held | None = None

    def acquire(self, wait: bool = True) -> None:
        """Take the lock, waiting for another holder if `wait`, else `Busy`."""
        held = _held(self.path)
        if not held.lock.acquire(blocking=wait):  # another thread holds it
            raise Busy(str(self.path))
        if not wait and held.count:  # this thread holds it already, and may not wait
            held.lock.release()
            raise Busy(str(self.path))
        self._mine = held
        held.count += 1
        if held.count == 1:
            try:
                held.fd = self._lock_file(wait)
            except BaseException:
                held.count -= 1
                self._mine = None
                held.lock.release()
                raise

    def _lock_file(self, wait: bool) -> int | None:
        """The locked descriptor of `path`; None where no lock can be had (a folder of
        another user's lock files, a read-only or lock-less file system: a warning)."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # others may lock too
            except OSError as err:
                _log.warning("%s: cannot make a lock file (%s); unlocked", self.path, err)
                return None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise Busy(str(self.path)) from None
                _log.warning("%s: no lock on this file system (%s); unlocked", self.path, err)
            if _same_file(fd, self.path):
                return fd
            os.close(fd)  # locked a file its holder's release unlinked meanwhile: again

    def release(self) -> None:
        """Drop the lock; the last holder in this process removes its file (a waiter that
        locked the removed file sees that and takes a new one), so that the output holds no
        lock files."""
        held, self._mine = self._mine, None
        if held is None:
            return
        held.count -= 1
        if held.count == 0 and held.fd is not None:
            if _same_file(held.fd, self.path):
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            os.close(held.fd)
            held.fd = None
        held.lock.release()

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class _Held:
    """This process's hold on one lock path: its thread lock, holders, locked descriptor."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.count = 0
        self.fd: int | None = None


_HELD: dict[str, _Held] = {}
_HELD_LOCK = threading.Lock()


def _held(path: Path) -> _Held:
    with _HELD_LOCK:
        return _HELD.setdefault(os.path.abspath(path), _Held())


def _same_file(fd: int, path: Path) -> bool:
    """Whether `fd` is the file at `path` (not one a release unlinked)."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def temp_name(path: Path) -> Path:
    """A hidden sibling of `path` no other process writes (its pid): same file system, so
    `os.replace` onto `path` is atomic."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and rename, fsynced (file and directory),
    so a kill leaves the old file or the new one, never part of one."""
    replace_together([(path, text)])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a file or a directory
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_together(files: Sequence[tuple[Path, str | Callable[[Path], object]]]) -> None:
    """Replace files that are read together (weights and their config, a tokenizer and its
    meta, an evaluation's results and summary): each `(target, write)` pair's `write` (text,
    written as UTF-8, or a function of the path) fills a temporary file (this process's: two
    writers never share one), fsynced, and only once all are written do they take their
    targets' places, fsynced in their folders.  With
    more than one, the last target (the one that describes the others) is removed first and
    renamed in last.  A failed write leaves every old file as it was, and its OSError names
    the file; a kill among the renames (or a rename that fails) leaves the last target
    missing, never new files beside an old one."""
    temps = [temp_name(target) for target, _ in files]
    try:
        for (target, write), tmp in zip(files, temps):
            try:
                if isinstance(write, str):
                    tmp.write_text(write, encoding="utf-8")
                else:
                    write(tmp)
                _fsync(tmp)
            except OSError as err:  # "File too large" alone named no file
                if err.errno is None:
                    raise OSError(f"{err}; nothing replaced: {str(target)!r}") from None
                raise OSError(err.errno, f"{err.strerror}; nothing replaced", str(target)) from None
        if len(files) > 1:
            files[-1][0].unlink(missing_ok=True)
        for (target, _), tmp in zip(files, temps):
            os.replace(tmp, target)
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):  # a parent that is a file: the error above says so
                tmp.unlink(missing_ok=True)
    for folder in dict.fromkeys(target.parent for target, _ in files):
        # the files are in place: a folder this user may write but not read (mode 0300), or a
        # file system without directory fsync, is no failure of the write
        with contextlib.suppress(OSError):
            _fsync(folder)
