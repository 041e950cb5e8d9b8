"""Bad input in the data stream: the error type and the counter of skipped samples.

Bad samples are skipped, counted by kind and logged once per kind and process (and not
again by later data-loader workers of the same run, see `mark_logged`), so a few broken
files never stop a run; a source where nothing is readable raises `DataError`.

Kinds: `truncated_tar`, `bad_tar`, `pipe_error`, `empty_shard`, `missing_shard`,
`bad_image`, `image_too_large`, `missing_image`, `missing_caption`, `bad_text`,
`bad_json`, `missing_field`; `mmssl shards` also counts `not_image` (a file in a class
folder, or a table's image path, that is no image by its extension).
"""

from __future__ import annotations

import logging
from typing import NoReturn

log = logging.getLogger("mmssl.data")

_LOGGED: set[str] = set()


def mark_logged(kinds: tuple[str, ...] | list[str]) -> None:
    """Kinds this process should count silently: a worker started after they were logged."""
    _LOGGED.update(kinds)


class DataError(ValueError):
    """Bad data or a bad data configuration; the message names the problem."""


class WorkerFailure:
    """A DataError that ended the stream, handed to the loader as an item (torch's own
    re-raise would make a worker's traceback its message), with the skip counts of the
    logical worker slot at the error.  `worker` is the data-loader worker's id, or None when
    the stream ran in the main process (no loader workers)."""

    def __init__(self, error: DataError, worker: int | None, logical: int, skipped: dict[str, int]):
        self.error, self.worker, self.logical, self.skipped = error, worker, logical, skipped

    def reraise(self, counted: dict[str, int] | None = None) -> NoReturn:
        """Raise the DataError, its message naming the data-loader worker if there was one,
        and `counted`: the damage that counting the shards found before the stream began."""
        message = str(self.error)
        if self.worker is not None:
            message += f" (in data-loader worker {self.worker})"
        if counted:
            message += f"; skipped while counting the shards: {counted}"
        self.error.args = (message,)
        raise self.error


class SkipCounter:
    """Counts skipped samples (or shards) by kind; warns once per kind per process."""

    def __init__(self, counts: dict[str, int] | None = None) -> None:
        self.counts: dict[str, int] = dict(counts or {})
        self.enabled = True  # off while a restore re-reads data that was already counted

    def add(self, kind: str, where: str, detail: str = "") -> None:
        """Count one skipped `kind`; the first of a kind in this process is logged with `where`
        and `detail`.  Does nothing while disabled."""
        if not self.enabled:
            return
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if kind not in _LOGGED:
            _LOGGED.add(kind)
            extra = f": {detail}" if detail else ""
            log.warning(
                "skipping bad input (%s) in %s%s; further %s are counted silently",
                kind,
                where,
                extra,
                kind,
            )

    def total(self) -> int:
        """Skips counted, all kinds together."""
        return sum(self.counts.values())
