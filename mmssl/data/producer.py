"""The worker side of the pipeline: deterministic batches plus their stream position.

Logical worker `l` (of W) of rank `r` produces exactly the batches `i` with
`i % W == l`; batch `i` draws from the source the schedule names, and its augmentation
RNG is seeded by (seed, epoch, rank, i).  Each batch is yielded with the worker's
position after it, which the consumer (`StreamLoader`) records.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmssl.data.augment import AugmentConfig, make_views
from mmssl.data.center import resize_center
from mmssl.data.decode import (
    BadSample,
    decode_fields,
    decode_image,
    decode_text,
    field_column,
    find_image,
)
from mmssl.data.errors import SkipCounter, mark_logged
from mmssl.data.stream import SampleStream, ShardSequence, epoch_order
from mmssl.data.text import TokenPacker, tokenize_captions


@dataclass(frozen=True)
class SourceSpec:
    """A resolved source: expanded URLs and what its samples hold."""

    name: str
    urls: tuple[str, ...]
    kind: str  # "image" | "image_text" | "text"
    weight: float
    epoch_batches: int  # per rank, epoch mode; 0 in resampled mode
    # epoch mode: samples per shard, for the split by samples (stream.py); empty (a set
    # Source.epoch_batches): split by whole shards
    shard_counts: tuple[int, ...] = ()
    # damage met while counting the samples of shards without a manifest entry (text: of
    # every shard), as (kind, count): the epoch's segments stop at the counted samples and
    # never meet it again
    preflight_skipped: tuple[tuple[str, int], ...] = ()
    # epoch mode, text sources: the tokens of each document (eos included, 0 if bad) by
    # shard, to give each slot its stretch of the epoch's tokens (`_text_runs`)
    doc_tokens: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class Plan:
    """Everything a worker needs; picklable, identical on every worker of a rank."""

    sources: tuple[SourceSpec, ...]
    batch_size: int
    mode: str
    seed: int
    shuffle: int
    rank: int
    world_size: int
    num_workers: int  # logical workers (>= 1)
    image_size: int
    num_views: int
    return_image: bool
    augment: AugmentConfig | tuple[AugmentConfig, ...]  # one per view: asymmetric views
    tokenizer: Any
    context_length: int
    json_fields: tuple[str, ...]
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    max_pixels: int

    def counted(self) -> dict[str, int]:
        """The damage that counting the sources' samples found (the same on every rank)."""
        total: dict[str, int] = {}
        for spec in self.sources:
            for kind, n in spec.preflight_skipped:
                total[kind] = total.get(kind, 0) + n
        return total

    def schedule(self, epoch: int) -> np.ndarray | None:
        """Epoch mode: the source index of every batch of the epoch (same on all ranks)."""
        if self.mode != "epoch":
            return None
        counts = [s.epoch_batches for s in self.sources]
        order = np.repeat(np.arange(len(counts)), counts)
        if len(self.sources) > 1:
            order = np.random.default_rng([self.seed, 0x50D, epoch]).permutation(order)
        return order

    def source_of(self, i: int, schedule: np.ndarray | None) -> int:
        """The source index of batch `i`: from the epoch's `schedule`, else a seeded draw by source
        weight (the same on every rank and worker)."""
        if schedule is not None:
            return int(schedule[i])
        if len(self.sources) == 1:
            return 0
        w = np.array([s.weight for s in self.sources], dtype=np.float64)
        u = np.random.default_rng([self.seed, 0x50C, i]).random()
        return int(np.searchsorted(np.cumsum(w / w.sum()), u, side="right").clip(0, len(w) - 1))


def identity_collate(x: Any) -> Any:
    """The loader's collate_fn: workers already yield whole batches."""
    return x


def ignore_sigterm(_worker_id: int) -> None:
    """The loader's worker_init_fn: a SIGTERM sent to the whole job (a scheduler's) does not
    stop a worker, whose parent may be saving a checkpoint for it (`mmssl.train.preempt`);
    the parent stops its workers, and a worker whose parent is gone exits on its own."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _Worker:
    """One logical worker's per-source streams, packers and skip counter."""

    def __init__(self, plan: Plan, epoch: int, worker: int, state: dict[str, Any] | None) -> None:
        self.plan, self.epoch, self.worker = plan, epoch, worker
        self.counter = SkipCounter((state or {}).get("skipped"))
        self.streams: dict[str, SampleStream] = {}
        self.packers: dict[str, TokenPacker] = {}
        # text, epoch mode: where this slot's run cuts its first and its last document, as
        # token offsets (start of the first, stop of the last; None: its end)
        self.cuts: dict[str, tuple[int, int | None]] = {}
        self.saved: dict[str, Any] = dict((state or {}).get("sources", {}))
        schedule = plan.schedule(epoch)
        for index, src in enumerate(plan.sources):
            need: list[int] = []
            run = None
            if schedule is not None and src.shard_counts:
                # samples each (rank, worker) slot takes from this source in the epoch: batch
                # i goes to worker i % W, on every rank
                per_worker = np.bincount(
                    np.flatnonzero(schedule == index) % plan.num_workers,
                    minlength=plan.num_workers,
                )
                need = [int(n) * plan.batch_size for n in per_worker] * plan.world_size
                if src.doc_tokens:  # need holds rows: split the epoch's tokens by them
                    slot = plan.rank * plan.num_workers + worker
                    start, count, head, tail = _text_runs(src.doc_tokens, plan, epoch, need)[slot]
                    need, run, self.cuts[src.name] = [], (start, count), (head, tail)
            seq = ShardSequence(
                len(src.urls),
                mode=plan.mode,
                seed=plan.seed,
                epoch=epoch,
                rank=plan.rank,
                world_size=plan.world_size,
                worker=worker,
                num_workers=plan.num_workers,
                shard_counts=src.shard_counts,
                need=need,
                run=run,
                source=index,
            )
            key = [plan.seed, epoch, plan.rank, worker, zlib_crc(src.name)]
            stream = SampleStream(
                list(src.urls),
                seq,
                shuffle=plan.shuffle,
                seed_key=key,
                counter=self.counter,
                last_stays_last=src.name in self.cuts,
            )
            self.streams[src.name] = stream
            saved = self.saved.get(src.name)
            if src.kind == "text":
                packer = TokenPacker(plan.tokenizer, plan.context_length)
                self.packers[src.name] = packer
                if saved is not None:
                    stream.load_state(packer.load_state(saved))
            elif saved is not None:
                stream.load_state(saved)

    def _image_batch(self, src: SourceSpec, i: int) -> dict[str, Any]:
        plan, stream = self.plan, self.streams[src.name]
        images: list[torch.Tensor] = []
        captions: list[str] = []
        keys: list[str] = []
        json_fields, max_pixels = plan.json_fields, plan.max_pixels
        fields: dict[str, list[Any]] = {f: [] for f in json_fields}
        texts = src.kind == "image_text"
        next_sample, mark_good = stream.next, stream.mark_good  # the per-sample loop: locals
        while len(images) < plan.batch_size:
            key, files, url = next_sample()
            try:
                img = decode_image(find_image(files), max_pixels)
                cap = decode_text(files) if texts else ""
                meta = decode_fields(files, json_fields) if json_fields else None
            except BadSample as bad:
                stream.count_bad(bad.kind, f"{url}:{key}", bad.detail)
                continue
            mark_good()
            images.append(img)
            captions.append(cap)
            keys.append(key)
            if meta is not None:
                for f in json_fields:
                    fields[f].append(meta[f])
        batch: dict[str, Any] = {"__key__": keys, "source": src.name}
        # the source's name in the key: two image sources of one run draw independent views
        rng = np.random.default_rng(
            [plan.seed, 0xA06, self.epoch, plan.rank, i, zlib_crc(src.name)]
        )
        size = plan.image_size
        if plan.return_image:
            batch["image"] = self._norm(resize_center(images, size))
        if plan.num_views:
            views, descs = make_views(images, plan.num_views, size, plan.augment, rng)
            batch["views"] = [self._norm(v) for v in views]
            batch["aug"] = descs
        if src.kind == "image_text":
            batch["caption"] = captions
            if plan.tokenizer is not None:
                batch["text"], batch["text_mask"] = tokenize_captions(
                    plan.tokenizer, captions, plan.context_length
                )
        for f, vals in fields.items():
            batch[f] = field_column(vals)
        return batch

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.plan.mean is None or self.plan.std is None:
            return x
        mean = torch.tensor(self.plan.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.plan.std).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

    def _text_batch(self, src: SourceSpec) -> dict[str, Any]:
        stream, packer = self.streams[src.name], self.packers[src.name]

        def next_doc() -> tuple[str, str, Any, tuple[int, int | None]]:
            while True:
                before = stream.state(before_next=True)  # the packer re-reads this document
                key, files, url = stream.next()
                try:
                    text = decode_text(files, "missing_text")
                except BadSample as bad:
                    stream.count_bad(bad.kind, f"{url}:{key}", bad.detail)
                    continue
                stream.mark_good()
                return key, text, before, self._doc_span(src.name, stream)

        rows, keys = packer.pack(self.plan.batch_size, next_doc)
        return {
            "text": rows,
            "text_mask": torch.ones_like(rows, dtype=torch.bool),
            "__key__": keys,
            "source": src.name,
        }

    def _doc_span(self, name: str, stream: SampleStream) -> tuple[int, int | None]:
        """The tokens of the document `stream` just gave that are this slot's: all of them,
        except at the two ends of its epoch run, which it shares with its neighbours."""
        if name not in self.cuts:
            return 0, None
        (k, index), bounds = stream.at, stream.raw.seq.bounds or []
        head, tail = self.cuts[name]
        if k >= len(bounds):  # read past its own run: whole documents
            return 0, None
        first = k == 0 and index == bounds[0][0]
        last = k == len(bounds) - 1 and index == bounds[-1][1] - 1
        return (head if first else 0), (tail if last else None)

    def batch(self, i: int, source: int) -> tuple[dict[str, Any], dict[str, Any]]:
        src = self.plan.sources[source]
        if src.kind == "text":
            out = self._text_batch(src)
            self.saved[src.name] = self.packers[src.name].state(self.streams[src.name].state())
        else:
            out = self._image_batch(src, i)
            self.saved[src.name] = self.streams[src.name].state()
        pos = {"sources": dict(self.saved), "skipped": dict(self.counter.counts), "batch": i}
        return out, pos


def _text_runs(
    doc_tokens: tuple[np.ndarray, ...], plan: Plan, epoch: int, rows: list[int]
) -> list[tuple[int, int, int, int | None]]:
    """Each slot's run of a text source's epoch, from its rows: the epoch's tokens (the
    documents in the epoch's shard order, each with its eos) are cut into consecutive
    stretches of rows x (context_length + 1) tokens, one a slot, so every token is read
    once and a document at a cut is shared by the two slots.  A bad document (0 tokens)
    exactly at a cut is the next slot's, and at the epoch's end the last slot's, so that
    some slot reads it and counts it.  Per slot: (first document, documents, token offset
    into the first, token stop in the last or None for its end)."""
    order = epoch_order(plan.seed, epoch, len(doc_tokens))
    tokens = np.concatenate([doc_tokens[i] for i in order])
    ends = np.cumsum(tokens)
    out: list[tuple[int, int, int, int | None]] = []
    pos = 0
    for n in rows:
        if n == 0:
            out.append((0, 0, 0, None))
            continue
        stop = pos + n * (plan.context_length + 1)
        first = int(np.searchsorted(ends, pos, side="left"))  # the first ending after `pos`...
        if tokens[first] > 0 and ends[first] == pos:  # ...or at it: the previous slot's
            first += 1
        last = int(np.searchsorted(ends, stop - 1, side="right"))  # the document holding stop - 1
        if stop == ends[-1]:  # the epoch's end: the bad documents after it too
            last = len(ends) - 1
        head = pos - int(ends[first] - tokens[first])  # into the first document
        tail = stop - int(ends[last] - tokens[last])  # into the last
        out.append((first, last - first + 1, head, None if tail == tokens[last] else tail))
        pos = stop
    return out


def zlib_crc(name: str) -> int:
    """A stable integer of a source name for seeding (`hash()` of a str changes per process)."""
    import zlib

    return zlib.crc32(name.encode("utf-8"))


class StreamDataset(IterableDataset):
    """Yields (batch, position) for this process's logical worker(s), in batch order."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.plan = plan
        self.epoch = 0
        self.next_batch = 0
        self.worker_states: dict[int, dict[str, Any]] = {}
        self.quiet: tuple[str, ...] = ()  # kinds of bad input already logged in this run
        self.current: _Worker | None = None  # the logical worker this iteration runs

    def __iter__(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        info = get_worker_info()
        mark_logged(self.quiet)
        plan, W = self.plan, self.plan.num_workers
        # rotate so that DataLoader worker 0 holds the next batch: round-robin stays in order
        logical = ((info.id if info is not None else 0) + self.next_batch) % W
        self.current = None
        worker = _Worker(plan, self.epoch, logical, self.worker_states.get(logical))
        self.current = worker
        schedule = plan.schedule(self.epoch)
        i = self.next_batch + (logical - self.next_batch) % W
        while schedule is None or i < len(schedule):
            batch, pos = worker.batch(i, plan.source_of(i, schedule))
            pos["worker"] = logical
            yield batch, pos
            i += W
