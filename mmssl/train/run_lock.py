"""One run at a time in a run directory.

Two launches into one `out_dir/name` (the same command started twice, a sweep whose runs
share a name) would resume from each other's checkpoints, delete them in rotation and
interleave `metrics.jsonl`.  Rank 0 therefore holds a POSIX record lock (`fcntl.lockf`) on
`RUN_DIR/.mmssl-run.lock` from before the resume is looked for until the run returns; a
second run is refused on every rank before it reads or writes anything in the directory.
A record lock belongs to its process: forked data-loader workers do not hold it, so the
kernel drops it the moment rank 0 ends, however it ends (a SIGKILLed run leaves nothing to
clean up), and NFS supports it (its flock emulation needs the same write-mode descriptor).
The empty file stays and means nothing alone: it is never written, so a finished run run
again changes no file; a directory the lock made for a run that was then refused before
writing anything is removed again.  A file system without locks gets a warning and the run
goes on unlocked.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

from mmssl import distributed
from mmssl.schema import ConfigError

_log = logging.getLogger(__name__)

LOCK_NAME = ".mmssl-run.lock"


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a training run's directory: its lock file (every run since runs
    lock), or the recipe next to checkpoints or metrics (a recipe.yaml alone may be a
    user's own)."""
    p = Path(path)
    return (p / LOCK_NAME).exists() or (
        (p / "recipe.yaml").exists()
        and ((p / "checkpoints").exists() or (p / "metrics.jsonl").exists())
    )


class RunDirLock:
    """The lock on one run directory, held by rank 0 between `acquire` and `release`."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None
        self.made = False  # whether acquire made the run directory

    def acquire(self) -> None:
        """Collective: rank 0 takes the lock; on every rank a ConfigError if another
        process holds it or the run directory cannot be made."""
        problem = self._take() if distributed.rank() == 0 else None
        problem = distributed.broadcast_object(problem)
        if problem:
            raise ConfigError(problem)

    def _take(self) -> str | None:
        """None once this process holds the lock (or the file system has no locks), else
        why it cannot."""
        run_dir = self.path.parent
        self.made = not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # validate checked it: something changed since
            return f"out_dir: cannot make the run directory {run_dir}: {err}"
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                return (
                    f"run directory {run_dir} is in use by another run (it holds "
                    f"{self.path}); wait for it to end or give this run another name"
                )
            _log.warning("%s: no lock on this file system (%s); running unlocked", self.path, err)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # locked a file that a refused run's release unlinked meanwhile
            os.close(fd)
            return self._take()
        self.fd = fd
        return None

    def release(self) -> None:
        """Drop the lock; remove the directory `acquire` made if the run wrote nothing in it."""
        if self.fd is None:
            return
        try:
            if self.made and [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:
                self.path.unlink()
                self.path.parent.rmdir()
        except OSError:  # another launch made its lock file there meanwhile: its directory
            pass
        os.close(self.fd)  # the process's record lock on the file goes with its descriptor
        self.fd = None
