"""The resumable sample stream of one (source, rank, worker): shard order, position, shuffle.

Everything is a pure function of (seed, epoch, rank, worker) plus a small position, so a
checkpoint stores only numbers:

- the shard sequence: in epoch mode the worker's part of a seeded permutation of the
  shards, cycled; in resampled mode draws with replacement from a counter-based RNG of
  its own per source (seeded by seed, rank, worker and the source's index).
  Shard `k` of the sequence is computable without replaying `0..k-1`.  With per-shard
  sample counts the epoch is split by samples: the permuted shards are read as one
  sequence of samples, and each (rank, worker) slot takes a contiguous run of the samples
  it will batch plus its share of the spares (the samples short of a batch per rank), so
  no sample repeats unless bad samples eat up a slot's spares; a slot's part is then a
  list of shard segments.  A text slot's run is the documents that hold its stretch of
  the epoch's tokens (`producer._text_runs`).  Without counts (a source with a set
  `epoch_batches`) each slot takes whole shards.  A slot that reads past its own part
  (bad samples ate its spares) reads it once more, so ranks stay disjoint, and then all
  the source's shards, whole, in the epoch's order: a slot whose own shards are
  unreadable still fills its batches, and only a source whose every shard is unreadable
  is an error.
- the raw position `(k, offset)`: shard `k` of the sequence, sample `offset` inside it
  (inside its segment).
- the shuffle is a block shuffle: the raw stream is cut into windows of `shuffle`
  samples, each emitted in a permutation seeded by (seed, epoch, rank, worker, window).
  A window is rebuilt on restore by re-reading it from its recorded start position, so
  the state holds `{window, start, emitted}` instead of the buffered bytes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from mmssl.data.errors import DataError, SkipCounter
from mmssl.data.tario import iter_shard

_DRAW_BLOCK = 1024
_UNCOUNTED = SkipCounter()  # what re-reads of an epoch report to: counted on the first read
_UNCOUNTED.enabled = False


class ShardSequence:
    """Shard `k` (an index into `urls`) that one worker reads, for k = 0, 1, 2, ..."""

    def __init__(
        self,
        num_shards: int,
        *,
        mode: str,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        worker: int,
        num_workers: int,
        shard_counts: Sequence[int] = (),
        need: Sequence[int] = (),
        run: tuple[int, int] | None = None,
        source: int = 0,
    ) -> None:
        """need: epoch mode with shard_counts: the samples of every (rank, worker) slot,
        rank-major; each slot's run starts where the previous slot's ends.  run: instead
        of need, this slot's run as (first sample, count) in the epoch's sample order.
        source: the source's index in the mixture, which seeds its own resampled draws."""
        self.mode = mode
        self.num_shards = num_shards
        # one draw stream per source: with a shared key, sources of equal shard counts drew
        # the same shard indices in lockstep.  Source 0 keeps the key it had before (state
        # version 2), so single-source resampled states saved then still resume exactly.
        self.key = [seed, rank, worker] + ([source] if source else [])
        self.bounds: list[tuple[int, int]] | None = None  # per k % len(mine): [start, stop)
        if mode == "epoch":
            perm = epoch_order(seed, epoch, num_shards)
            self.order = [int(i) for i in perm]  # read whole after two passes of its own
            slots = world_size * num_workers
            slot = rank * num_workers + worker
            if need:
                # the samples no batch needs are shared out as spares: a slot that meets bad
                # samples reads on into its spares before it repeats any
                spare = max(0, sum(shard_counts) - sum(need))
                runs = [n + spare // slots + (j < spare % slots) for j, n in enumerate(need)]
                run = sum(runs[:slot]), runs[slot]
            if run is not None:
                segments = _segments([(int(i), shard_counts[i]) for i in perm], *run)
                self.mine = [s for s, _, _ in segments]
                self.bounds = [(a, b) for _, a, b in segments]
                return
            self.mine = [int(i) for i in perm[slot::slots]]
            if not self.mine:
                raise DataError(
                    f"epoch mode needs at least {slots} shards (ranks x workers), got "
                    f"{num_shards}; use mode='resampled' or write more shards"
                )
        else:
            self.mine = list(range(num_shards))
        self._block = -1
        self._draws: np.ndarray = np.empty(0, dtype=np.int64)

    def span(self, k: int) -> tuple[int, int | None]:
        """[start, stop) of the samples that shard k of the sequence contributes (stop None:
        to the end of the shard)."""
        if self.bounds is None or k >= 2 * len(self.bounds):
            return 0, None
        return self.bounds[k % len(self.bounds)]

    def pass_of(self, k: int) -> int:
        """Epoch mode: 0 and 1 for the two passes over the slot's own part, p >= 2 for the
        (p - 1)-th pass over all the source's shards after them (resampled mode: 0)."""
        n = len(self.mine)
        if self.mode != "epoch":
            return 0
        return k // n if k < 2 * n else 2 + (k - 2 * n) // self.num_shards

    def __getitem__(self, k: int) -> int:
        if self.mode == "epoch":
            n = len(self.mine)
            return self.mine[k % n] if k < 2 * n else self.order[(k - 2 * n) % self.num_shards]
        block = k // _DRAW_BLOCK
        if block != self._block:
            rng = np.random.default_rng([*self.key, 0x5A3D, block])
            self._draws = rng.integers(0, self.num_shards, size=_DRAW_BLOCK)
            self._block = block
        return int(self._draws[k % _DRAW_BLOCK])


def epoch_order(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    """The seeded shard permutation of an epoch, the same on every rank and worker."""
    return np.random.default_rng([seed, 0xE90C, epoch]).permutation(num_shards)


def _segments(order: list[tuple[int, int]], start: int, length: int) -> list[tuple[int, int, int]]:
    """(shard, start, stop) pieces of the run of `length` samples from sample `start` of
    `order` ((shard, count) pairs read as one sequence, wrapping around at its end)."""
    total = sum(c for _, c in order)
    if total == 0 or length == 0:
        return []
    pos, left, out = start % total, length, []
    while left > 0:
        for shard, count in order:
            if pos >= count:  # the run starts after this shard
                pos -= count
                continue
            take = min(count - pos, left)
            out.append((shard, pos, pos + take))
            pos, left = 0, left - take
            if left == 0:
                break
    return out


class RawStream:
    """Samples in shard-sequence order from a raw position; detects all-empty sources."""

    def __init__(self, urls: list[str], seq: ShardSequence, counter: SkipCounter) -> None:
        self.urls, self.seq, self.counter = urls, seq, counter
        self.k, self.offset = 0, 0
        self._it: Iterator[tuple[str, dict[str, bytes]]] | None = None
        # shards read whole (no segment bounds) since the last sample that held none
        self._empty: set[int] = set()

    def seek(self, k: int, offset: int) -> None:
        """Move to sample `offset` of shard-sequence position `k`; the open shard is kept when
        already there."""
        if (k, offset) == (self.k, self.offset) and self._it is not None:
            return  # already there: keep reading the open shard
        if self._it is not None:
            self._it.close()  # type: ignore[attr-defined]
        self.k, self.offset, self._it = k, offset, None

    def pass_of(self, k: int) -> int:
        """Which pass over the shards position `k` belongs to (see `ShardSequence.pass_of`)."""
        return self.seq.pass_of(k)

    def next(
        self, within_pass: int | None = None
    ) -> tuple[str, dict[str, bytes], int, tuple[int, int]] | None:
        """(key, files, url index, (k, sample index in the shard)) of the sample at the
        current position; advances.

        With `within_pass`, returns None instead of crossing into the next pass.
        """
        while True:
            if within_pass is not None and self.pass_of(self.k) != within_pass:
                return None
            shard = self.seq[self.k]
            start, stop = self.seq.span(self.k)
            if self._it is None:
                # a later pass re-reads samples whose damage the first pass counted (this
                # slot's own, or another slot's when reading all shards)
                counter = self.counter if self.pass_of(self.k) == 0 else _UNCOUNTED
                self._it = iter_shard(self.urls[shard], counter, skip=start + self.offset)
            done = stop is not None and start + self.offset >= stop
            item = None if done else next(self._it, None)
            if item is not None:
                self.offset += 1
                self._empty.clear()
                return item[0], item[1], shard, (self.k, start + self.offset - 1)
            if self.offset == 0 and (start, stop) == (0, None):
                self._empty.add(shard)
                if len(self._empty) == self.seq.num_shards:
                    raise DataError(
                        f"no readable sample in any of {self.seq.num_shards} shards "
                        f"(first: {self.urls[0]}); skipped: {self.counter.counts}"
                    )
            self._it.close()  # type: ignore[attr-defined]  # a segment may end mid-shard
            self._it = None
            self.k, self.offset = self.k + 1, 0

    def take(
        self, n: int, within_pass: int
    ) -> list[tuple[str, dict[str, bytes], int, tuple[int, int]]]:
        """Up to `n` samples of pass `within_pass` from the current position, as `next`
        gives them; fewer (none) at the end of the pass.  The rest of an open shard is read
        without `next`'s per-sample checks: a window of samples cost 1-2 us less a sample."""
        out: list[tuple[str, dict[str, bytes], int, tuple[int, int]]] = []
        while len(out) < n:
            item = self.next(within_pass)  # opens and leaves shards, finds all-empty sources
            if item is None:
                break
            out.append(item)
            shard, k = item[2], self.k
            start, stop = self.seq.span(k)
            room = n - len(out)
            if stop is not None:
                room = min(room, stop - start - self.offset)
            it, offset = self._it, self.offset
            assert it is not None
            for got in itertools.islice(it, room):
                out.append((got[0], got[1], shard, (k, start + offset)))
                offset += 1
            self.offset = offset
        return out


class SampleStream:
    """Block-shuffled samples of one worker; `state()` after any sample resumes exactly.

    The caller reports each decodable sample with `mark_good()`; a run of windows with
    none that reads every shard of the source whole raises DataError instead of spinning.
    """

    def __init__(
        self,
        urls: list[str],
        seq: ShardSequence,
        *,
        shuffle: int,
        seed_key: list[int],
        counter: SkipCounter,
        last_stays_last: bool = False,
    ) -> None:
        self.raw = RawStream(urls, seq, counter)
        # a text slot's run ends inside its last document: that piece has no eos, so the
        # block shuffle must not put another document after it (a junction no text has)
        self.last_stays_last = last_stays_last
        self.urls = urls
        self.shuffle = max(1, int(shuffle))
        self.seed_key = seed_key
        self.counter = counter
        self.window_index = -1
        self.start = (0, 0)
        self.window: list[tuple[str, dict[str, bytes], int, tuple[int, int]]] = []
        self.at = (0, 0)  # (k, sample index in the shard) of the last sample `next` gave
        self.order: list[int] = []
        self.emitted = 0
        self._good = True
        # a run of windows without a good sample: the next sequence position to count, and
        # the shards read whole (offset 0 to end) inside the run
        self._bad_k: int | None = None
        self._bad_whole: set[int] = set()

    def _fill(self, index: int, start: tuple[int, int]) -> None:
        if self._good:
            self._bad_k = None
        else:  # every sample between the run's first window and `start` was bad
            if self._bad_k is None:
                self._bad_k = self.start[0] + (self.start[1] > 0)
                self._bad_whole = set()
            seq = self.raw.seq
            while self._bad_k < start[0]:  # shards the raw stream has moved past
                if seq.span(self._bad_k) == (0, None):  # read whole, not a segment
                    self._bad_whole.add(seq[self._bad_k])
                self._bad_k += 1
            if len(self._bad_whole) == seq.num_shards:
                raise DataError(
                    f"every sample is bad in all {seq.num_shards} shards "
                    f"(first: {self.urls[0]}); skipped: {self.counter.counts}"
                )
        self._good = False
        self.window_index, self.start = index, start
        self.raw.seek(*start)
        # a window never spans two passes over the shards, so an epoch-mode worker emits
        # all of its samples once before it repeats any
        this_pass = self.raw.pass_of(start[0])
        self.window = []
        while len(self.window) < self.shuffle:
            items = self.raw.take(self.shuffle - len(self.window), this_pass)
            if not items:
                if self.window:
                    break
                this_pass = self.raw.pass_of(self.raw.k)
                continue
            self.window.extend(items)
        if len(self.window) > 1:
            rng = np.random.default_rng([*self.seed_key, 0x5B0F, index])
            self.order = [int(i) for i in rng.permutation(len(self.window))]
            bounds = self.raw.seq.bounds
            if self.last_stays_last and this_pass == 0 and bounds:
                end = (len(bounds) - 1, bounds[-1][1] - 1)  # the run's last sample
                last = [i for i in self.order if self.window[i][3] == end]
                self.order = [i for i in self.order if i not in last] + last
        else:
            self.order = [0]
        self.emitted = 0

    def next(self) -> tuple[str, dict[str, bytes], str]:
        """(key, files, url) of the next sample."""
        if self.window_index < 0 or self.emitted >= len(self.window):
            self._fill(self.window_index + 1, (self.raw.k, self.raw.offset))
        key, files, shard, self.at = self.window[self.order[self.emitted]]
        self.emitted += 1
        return key, files, self.urls[shard]

    def mark_good(self) -> None:
        """Report that the last sample from `next()` decoded (see the class docstring)."""
        self._good = True

    def count_bad(self, kind: str, where: str, detail: str = "") -> None:
        """Count the last sample from `next()` as bad, unless this slot read it in an epoch's
        later pass: its own part again (counted the first time) or, after that, every shard
        (counted by the slot whose part holds it; one that never reached it, its batches
        full, does not)."""
        if self.raw.pass_of(self.at[0]) == 0:
            self.counter.add(kind, where, detail)

    def state(self, before_next: bool = False) -> dict[str, Any]:
        """The position; `before_next`: taken right before a `next()` whose sample will be
        re-read on restore.  A spent window is then given as the next one, which that
        `next()` fills (and counts the skips of), so a restore refills it with the counter
        off instead of counting them again."""
        if before_next and 0 <= self.window_index and self.emitted >= len(self.window):
            start = [self.raw.k, self.raw.offset]
            return {"window": self.window_index + 1, "start": start, "emitted": 0}
        return {"window": self.window_index, "start": list(self.start), "emitted": self.emitted}

    def load_state(self, state: dict[str, Any]) -> None:
        """Rebuild the window from its start and skip the samples already emitted."""
        if state["window"] < 0:
            return
        enabled, self.counter.enabled = self.counter.enabled, False  # counted before
        try:
            self._fill(int(state["window"]), (int(state["start"][0]), int(state["start"][1])))
        finally:
            self.counter.enabled = enabled
        self.emitted = int(state["emitted"])
        self._good = True
