"""The streaming pipeline: `build_pipeline(...)` -> `StreamLoader`, an exactly resumable loader.

Shards -> seeded shard order (epoch) or resampling -> split by rank and worker ->
block shuffle -> decode -> augment (views + v1 descriptors) / tokenise / pack ->
batch dict (DESIGN.md):

- `image` float (B, 3, S, S): shorter side resized to S, centre crop (if `return_image`);
- `views`: list of `num_views` float (B, 3, S, S); `aug`: list of (B, 13) descriptors;
- `text` int64 (B, T), `text_mask` bool (B, T) with T = context_length for captions; for
  text (LM) sources T = context_length + 1 packed tokens, mask all True (inputs
  `text[:, :-1]`, targets `text[:, 1:]`);
- `caption` list[str] (image-text sources), one int64/float tensor (B,) per requested
  json field (e.g. `label`, `digit`, `color`), `__key__` list[str], `source` str.

Epoch mode: every rank yields exactly `epoch_batches = floor(samples / (world_size *
batch_size))` batches per source and epoch (counts from the shards' manifest.json), so no
rank waits for another.  Each (rank, worker) slot reads its own run of samples; samples
beyond a rank's share are dropped.  A text source is tokenised once up front (rows, not
samples, set its `epoch_batches`), and each slot reads its own stretch of the epoch's
tokens, so no token is read twice in an epoch.  With several
sources an epoch holds every source's batches in a seeded order (weights are ignored);
in resampled mode each batch picks its source by weight.  Every rank picks the same
source for batch i, so collective losses line up.

`state_dict()` holds, per logical worker, each source's stream position (see
`mmssl.data.stream`), the LM packer's document offset and the skip counts, plus epoch and
batch index and the skip counts of finished epochs; `load_state_dict` continues the
identical stream (keys and tensors).  A kind of bad input already counted is not logged
again by the workers of later epochs or of a resumed run.
"""

from __future__ import annotations

import atexit
import math
import os
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, get_worker_info

from mmssl.data.args import check_args, check_norm
from mmssl.data.augment import AugmentConfig
from mmssl.data.decode import DEFAULT_MAX_PIXELS, BadSample, decode_text
from mmssl.data.errors import DataError, SkipCounter, WorkerFailure
from mmssl.data.manifest import manifest_counts
from mmssl.data.producer import Plan, SourceSpec, StreamDataset, identity_collate, ignore_sigterm
from mmssl.data.tario import samples_for_counting
from mmssl.data.urls import check_no_repeats, check_urls, expand_urls, is_local

# 3: in resampled mode each source draws its shards from its own seeded stream (version 2
# drew the same indices for every source); the streams of epoch mode and of source 0 are
# unchanged, so version 2 states of those still load
# 4: a batch's view parameters come from one generator call (`augment.sample_params`), so
# the same position renders other views than versions 2 and 3 did; their states still
# load where no views are drawn (num_views=0, text sources)
# 5: LM rows of text sources hold context_length + 1 tokens (the Task reads the first
# context_length; version 4's training packed rows one shorter, its last position untrained):
# states 2-4 of pipelines without a text source still load
# 6: a text source's epoch run starts at the bad documents at its cut (5 started past them):
# states 2-5 of pipelines without an epoch-mode text source with bad documents still load
STATE_VERSION = 6


@dataclass(frozen=True)
class Source:
    """One dataset to stream: URL pattern(s), kind and mixing weight."""

    urls: str | tuple[str, ...]
    kind: str = "image_text"  # "image" | "image_text" | "text" (documents for the LM)
    weight: float = 1.0
    name: str = ""
    epoch_batches: int | None = None  # override the per-rank epoch length


def _doc_tokens(
    urls: list[str], tokenizer: Any, shard_damage: SkipCounter, bad_docs: SkipCounter
) -> tuple[np.ndarray, ...]:
    """Tokens of every document of a text source (eos included; 0 for a bad one), by shard
    (tokenises every document once).  Damage to the shards themselves that the stream never
    meets goes to `shard_damage` (see `tario.samples_for_counting`), undecodable or missing
    text to `bad_docs`."""
    out = []
    for url in urls:
        lengths = []
        for key, files in samples_for_counting(url, shard_damage):
            try:
                text = decode_text(files, "missing_text")
            except BadSample as bad:
                bad_docs.add(bad.kind, f"{url}:{key}", bad.detail)
                lengths.append(0)
                continue
            lengths.append(len(tokenizer.encode(text, add_bos=False, add_eos=False)) + 1)
        out.append(np.asarray(lengths, dtype=np.int64))
    return tuple(out)


def _weight(value: Any) -> float:
    """`value` as a float, nan when it is no number (bools and strings included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return math.nan
    return float(value)


def _resolve(
    src: Source, index: int, mode: str, slots: int, world: int, batch: int, plan_args: dict
) -> SourceSpec:
    if src.kind not in ("image", "image_text", "text"):
        raise DataError(f"source kind must be image, image_text or text, got {src.kind!r}")
    if src.kind == "text" and plan_args["tokenizer"] is None:
        raise DataError("a text (LM) source needs a tokenizer")
    name = src.name or f"source{index}"
    weight = _weight(src.weight)
    # nan used to pass `weight <= 0` and made the source's share of draws nan: never drawn.
    # Every weight > 0 also keeps the mixture's total > 0 (no all-zero mixture to draw from).
    if not (math.isfinite(weight) and weight > 0):
        raise DataError(
            f"source {name} weight must be a finite number > 0 (its share of the draws in "
            f"resampled mode), got {src.weight!r}"
        )
    urls = expand_urls(src.urls)
    check_urls(src.urls, urls)
    n_batches = rows = 0
    counts: list[int] = []
    doc_tokens: tuple[np.ndarray, ...] = ()
    # what counting the samples met that the stream never meets: damage after a shard's
    # last sample (`tario.samples_for_counting`)
    skipped = SkipCounter()
    bad_docs = SkipCounter()  # text: undecodable documents (the stream meets them again)
    if mode == "epoch":
        check_no_repeats(src.urls, urls)
        if len(urls) < slots:
            raise DataError(
                f"epoch mode needs at least ranks x workers = {slots} shards per source, but "
                f"{src.urls!r} has {len(urls)}; use mode='resampled' (infinite, samples with "
                f"replacement) or write more, smaller shards"
            )
        if src.epoch_batches is not None:
            n_batches = int(src.epoch_batches)
        elif src.kind == "text":
            doc_tokens = _doc_tokens(urls, plan_args["tokenizer"], skipped, bad_docs)
            counts = [len(t) for t in doc_tokens]
            tokens = int(sum(t.sum() for t in doc_tokens))
            rows = tokens // (plan_args["context_length"] + 1)
            n_batches = rows // (world * batch)
        else:
            known = manifest_counts(urls)
            for u in urls:
                key = os.path.abspath(u)
                if key in known:
                    counts.append(known[key])
                elif is_local(u):
                    counts.append(sum(1 for _ in samples_for_counting(u, skipped)))
                else:
                    raise DataError(
                        f"epoch mode needs sample counts: {u} has no manifest.json entry; "
                        f"write one (mmssl shards does) or set the source's epoch_batches (in a recipe: "
                        f"data.sources.NAME.epoch_batches), or use resampled mode"
                    )
            n_batches = sum(counts) // (world * batch)
        damage = dict(skipped.counts)
        for kind, n in bad_docs.counts.items():
            damage[kind] = damage.get(kind, 0) + n
        if n_batches < 1 and damage:
            # a broken source rather than a small one: "lower batch_size" would mislead
            what = f"{rows} packed rows" if src.kind == "text" else f"{sum(counts)} samples"
            bad = ", ".join(f"{k}: {n}" for k, n in sorted(damage.items()))
            raise DataError(
                f"source {name} has {what} readable, less than one batch per rank "
                f"({world} ranks x batch {batch}); skipped as bad: {bad} "
                f"(check its shards, first: {urls[0]})"
            )
        if n_batches < 1:
            raise DataError(
                f"source {name} is smaller than one batch per rank "
                f"({world} ranks x batch {batch}); lower batch_size"
            )
    # damage after the counted samples: the epoch's segments never meet it (what lies
    # between samples they count themselves)
    found = tuple(sorted(skipped.counts.items())) if counts else ()
    return SourceSpec(
        name, tuple(urls), src.kind, weight, n_batches, tuple(counts), found, doc_tokens
    )


# Iterators whose loader workers run, closed at interpreter exit if still open then (a
# script's `it = iter(loader)` kept to the end): multiprocessing's own exit handler SIGTERMs
# the workers, which ignore it (`producer.ignore_sigterm`), and then waits for them for ever.
# Closing the iterator first shuts its DataLoader down as a `break` out of it does.
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register  # after multiprocessing's handler (imported with torch above): runs first
def _close_live() -> None:
    for batches in list(_LIVE):
        try:
            batches.close()  # type: ignore[attr-defined]  # a generator
        except Exception:  # noqa: BLE001 -- at exit: the others still close
            pass


class _WorkerDataset(StreamDataset):
    """The StreamDataset a StreamLoader runs, in its loader workers or (without workers) in
    the main process: a DataError becomes a `WorkerFailure` that carries the skip counts."""

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        try:
            yield from super().__iter__()
        except DataError as err:
            worker = info.id if info is not None else None
            logical = ((worker or 0) + self.next_batch) % self.plan.num_workers  # as the parent's
            # the slot's own counter (seeded with its saved counts) holds what it skipped;
            # an error before the slot was built leaves its saved counts
            held = self.worker_states.get(logical, {}).get("skipped", {})
            skipped = dict(self.current.counter.counts if self.current is not None else held)
            yield WorkerFailure(err, worker, logical, skipped)


class StreamLoader:
    """Iterable over batch dicts; `state_dict()` / `load_state_dict()` resume exactly.

    In epoch mode one `iter()` is one epoch (`len()` batches) and the next `iter()`
    continues with the next epoch; in resampled mode iteration never ends.
    """

    def __init__(self, plan: Plan, num_workers: int, pin_memory: bool = False) -> None:
        self.plan = plan
        self.loader_workers = num_workers
        self.pin_memory = pin_memory
        self.epoch = 0
        self.next_batch = 0
        self.workers: dict[int, dict[str, Any]] = {}
        # a slot's skip counts at the DataError that ended the last iteration: reported, but
        # no resumable state (they include the batch that was never delivered)
        self.failed: dict[int, dict[str, int]] = {}
        self.skipped_done: dict[str, int] = {}  # skip counts of finished epochs

    def __len__(self) -> int:
        if self.plan.mode != "epoch":
            raise TypeError("a resampled stream has no length")
        return sum(s.epoch_batches for s in self.plan.sources)

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped samples by kind, summed over workers and epochs (as of the last consumed
        batch), plus on rank 0 the damage that counting samples found after a shard's last
        sample (every rank counts the same shards; the stream never reads that damage, and
        counting leaves out what it does read, such as a key repeated mid-shard)."""
        total = self._streamed()
        for kind, n in (self.plan.counted() if self.plan.rank == 0 else {}).items():
            total[kind] = total.get(kind, 0) + n
        return total

    def _streamed(self) -> dict[str, int]:
        """What the stream itself skipped: finished epochs plus the workers' counts."""
        total = dict(self.skipped_done)
        slots = {k: state.get("skipped", {}) for k, state in self.workers.items()}
        for counts in {**slots, **self.failed}.values():
            for kind, n in counts.items():
                total[kind] = total.get(kind, 0) + n
        return total

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = self._batches()
        if self.loader_workers > 0:
            _LIVE.add(batches)
        return batches

    def _batches(self) -> Iterator[dict[str, Any]]:
        dataset = _WorkerDataset(self.plan)
        dataset.epoch, dataset.next_batch = self.epoch, self.next_batch
        dataset.worker_states = {k: dict(v) for k, v in self.workers.items()}
        dataset.quiet = tuple(sorted(self.skipped))
        self.failed = {}
        if self.loader_workers > 0:
            items: Any = DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.loader_workers,
                collate_fn=identity_collate,
                pin_memory=self.pin_memory,
                worker_init_fn=ignore_sigterm,
            )
        else:
            items = dataset
        for item in items:
            if isinstance(item, WorkerFailure):
                self.failed[item.logical] = item.skipped
                item.reraise(self.plan.counted())
            batch, pos = item
            self.workers[int(pos.pop("worker"))] = pos
            self.next_batch = int(pos["batch"]) + 1
            yield batch
        # an epoch is over: the next iter() starts the next one from scratch
        self.skipped_done = self._streamed()
        self.epoch += 1
        self.next_batch = 0
        self.workers = {}

    def _identity(self) -> dict[str, Any]:
        """What a saved position must match to be restored here."""
        p = self.plan
        return {
            "version": STATE_VERSION,
            "mode": p.mode,
            "seed": p.seed,
            "rank": p.rank,
            "world_size": p.world_size,
            "num_workers": p.num_workers,
            "batch_size": p.batch_size,
            "shuffle": p.shuffle,
            # a position indexes the shard list, so its length matters (not the paths: data
            # may move); kind, weight and epoch length fix which batches come from where
            "sources": [
                [s.name, s.kind, len(s.urls), s.weight, s.epoch_batches] for s in p.sources
            ],
        }

    def state_dict(self) -> dict[str, Any]:
        """The position after the last consumed batch (plain ints, lists, dicts, str).

        After an epoch's last batch that is the start of the next epoch, so that the first
        `iter()` after a restore yields a whole epoch rather than an empty one."""
        if self.plan.mode == "epoch" and self.next_batch >= len(self):
            epoch, next_batch, workers, done = self.epoch + 1, 0, {}, self._streamed()
        else:
            epoch, next_batch, workers, done = (
                self.epoch,
                self.next_batch,
                self.workers,
                self.skipped_done,
            )
        return {
            **self._identity(),
            "epoch": epoch,
            "next_batch": next_batch,
            "workers": {str(k): v for k, v in sorted(workers.items())},
            "skipped_done": dict(done),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`; DataError when it was saved by a pipeline of other
        settings or a state version whose position would not continue the same stream."""
        identity = self._identity()
        old = state.get("version")
        if old in (2, 3, 4) and any(s.kind == "text" for s in self.plan.sources):
            raise DataError(
                f"data state version {old} was saved when training packed LM rows one token "
                f"shorter (version {STATE_VERSION} trains every position of the context), so "
                "this position would continue with rows cut otherwise: resume with the mmssl "
                "version that saved it, or do not load this state (the stream starts afresh; "
                "for `mmssl train`: a new run)"
            )
        # version 5 cut the same runs where a text source has no bad document
        if old == 5 and any((t == 0).any() for s in self.plan.sources for t in s.doc_tokens):
            raise DataError(
                f"data state version 5 was saved when a text source's epoch run started past "
                f"the bad documents at its cut (version {STATE_VERSION} starts there), so this "
                "position would go on at another document: resume with the mmssl version that "
                "saved it, or do not load this state (for `mmssl train`: a new run)"
            )
        if old in (4, 5):
            identity["version"] = old  # the same stream
        if old in (2, 3) and state.get("mode") == self.plan.mode:
            p = self.plan
            if p.num_views > 0 and any(s.kind != "text" for s in p.sources):
                raise DataError(
                    f"data state version {old} was saved when every view parameter had a "
                    f"generator call of its own; version {STATE_VERSION} draws a batch's in one "
                    "call, so this position would continue with other augmented views than the "
                    "run that saved it: resume with the mmssl version that saved it, or do not "
                    "load this state (the stream starts afresh; for `mmssl train`: a new run)"
                )
            if old == 3 or self.plan.mode == "epoch" or len(self.plan.sources) == 1:
                identity["version"] = old  # no views: the same stream, it continues exactly
            else:
                raise DataError(
                    "data state version 2 was saved when every source of a resampled mixture "
                    "drew the same shard indices; here each source draws its own, so the saved "
                    "position of sources after the first is no continuation: resume with the "
                    "mmssl version that saved it, or do not load this state (the stream starts "
                    "afresh; for `mmssl train`: a new run)"
                )
        for key, want in identity.items():
            if key == "sources" and state.get(key) != want:
                raise DataError(_sources_changed(state.get(key), want))
            if state.get(key) != want:
                raise DataError(
                    f"data state was saved with {key}={state.get(key)!r} but this pipeline has "
                    f"{key}={want!r}; the stream position cannot be transferred"
                )
        self.epoch = int(state["epoch"])
        self.next_batch = int(state["next_batch"])
        self.workers = {int(k): v for k, v in state["workers"].items()}
        self.skipped_done = dict(state.get("skipped_done", {}))


# a saved source's fields; the epoch length follows from the shards' sample counts, the batch
# size and, for text, the context length
_SOURCE_FIELDS = ("name", "kind", "shard count", "weight", "epoch length in batches")


def _sources_changed(saved: Any, now: list[list[Any]]) -> str:
    """What differs between a saved position's sources and this pipeline's, field by field."""
    pairs = zip(saved, now) if isinstance(saved, list) and len(saved) == len(now) else []
    diffs = [
        f"source {new[0]!r}: {field} {a!r} when saved, {b!r} now"
        for old, new in pairs
        if isinstance(old, list)
        for field, a, b in zip(_SOURCE_FIELDS, old, new)
        if a != b
    ] or [f"sources {saved!r} when saved, {now!r} now"]
    return "; ".join(diffs) + "; the stream position cannot be transferred"


def build_pipeline(
    urls: str | Sequence[str] | None = None,
    *,
    batch_size: int,
    sources: Sequence[Source] | None = None,
    kind: str = "image_text",
    mode: str = "resampled",
    seed: int = 0,
    shuffle: int = 1000,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    image_size: int = 224,
    num_views: int = 2,
    return_image: bool = True,
    augment: AugmentConfig | tuple[AugmentConfig, ...] | None = None,
    tokenizer: Any = None,
    context_length: int = 77,
    json_fields: Sequence[str] = (),
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    pin_memory: bool = False,
) -> StreamLoader:
    """Build the stream; pass `urls` (+ `kind`) for one source or `sources` for a mixture.

    Images come out in [0, 1] unless `mean`/`std` are given.  `shuffle` is the block-shuffle
    window in samples (1 = no shuffle).  `rank`/`world_size` default to
    `mmssl.distributed.rank()/world_size()`.  Raises DataError on pre-flight problems.
    """
    if (urls is None) == (sources is None):
        raise DataError("pass exactly one of urls= or sources=")
    if mode not in ("resampled", "epoch"):
        raise DataError(f"mode must be 'resampled' or 'epoch', got {mode!r}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if rank is None or world_size is None:
        from mmssl import distributed

        rank = distributed.rank() if rank is None else rank
        world_size = distributed.world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    check_args(image_size, num_views, seed, shuffle, num_workers, max_pixels, augment)
    check_norm(mean, std)
    if sources is None:
        assert urls is not None
        sources = [Source(urls if isinstance(urls, str) else tuple(urls), kind=kind)]
    logical = max(1, num_workers)
    args = {"tokenizer": tokenizer, "context_length": context_length}
    specs = tuple(
        _resolve(s, i, mode, world_size * logical, world_size, batch_size, args)
        for i, s in enumerate(sources)
    )
    if len({s.name for s in specs}) != len(specs):
        raise DataError(f"source names must be unique, got {[s.name for s in specs]}")
    plan = Plan(
        sources=specs,
        batch_size=batch_size,
        mode=mode,
        seed=seed,
        shuffle=shuffle,
        rank=rank,
        world_size=world_size,
        num_workers=logical,
        image_size=image_size,
        num_views=num_views,
        return_image=return_image,
        augment=augment or AugmentConfig(),
        tokenizer=tokenizer,
        context_length=context_length,
        json_fields=tuple(json_fields),
        mean=mean,
        std=std,
        max_pixels=max_pixels,
    )
    return StreamLoader(plan, num_workers, pin_memory)
