"""Text (LM) sources against the data itself, with bad documents anywhere (at slots' cuts
and at the epoch's ends too):
- exact resume: save after every batch, restore in a fresh pipeline, and the token rows
  and skip counts equal the uninterrupted run's (epoch and resampled mode, 0 and 2 workers,
  2 ranks);
- a text epoch over 2 ranks x 2 workers against a naive enumeration of the data: the
  slots' rows in slot order are the epoch's first tokens (shuffle 1) or the same multiset
  (shuffle > 1), and each bad document is counted once an epoch over all slots.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from text_docs_helpers import naive_epoch, pipe, write_docs


def _data(tmp_path, seed, n=40, per_shard=8):
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(1, 9, size=n)]
    # some documents end exactly on a row end: lengths chosen at random; bad docs anywhere
    bad = set(int(x) for x in rng.choice(n, size=6, replace=False)) | {0, n - 1}
    return write_docs(tmp_path, lengths, bad, per_shard), lengths, bad


def _uninterrupted(url, n, kw):
    pl = pipe(url, **kw)
    out = []
    it = iter(pl)
    while len(out) < n:
        try:
            b = next(it)
        except StopIteration:
            it = iter(pl)
            continue
        out.append((b["text"].tolist(), dict(pl.skipped)))
    return out


def _chained(url, n, kw):
    out, state = [], None
    while len(out) < n:
        pl = pipe(url, **kw)
        if state is not None:
            pl.load_state_dict(state)
        b = next(iter(pl))
        out.append((b["text"].tolist(), dict(pl.skipped)))
        state = pl.state_dict()
    return out


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(("seed", "shuffle"), [(0, 1), (1, 4)])
def test_text_resume_after_every_batch(tmp_path, mode, workers, seed, shuffle):
    url, _, _ = _data(tmp_path, seed)
    kw = dict(
        batch_size=2,
        mode=mode,
        seed=seed,
        shuffle=shuffle,
        rank=0,
        world_size=1,
        num_workers=workers,
        context_length=4,
    )
    n = 16 if workers else 30
    ref = _uninterrupted(url, n, kw)
    got = _chained(url, n, kw)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a == b, f"batch {i}"


@pytest.mark.parametrize(
    ("rank", "workers", "seed", "shuffle"), [(0, 0, 0, 1), (1, 2, 0, 3), (1, 0, 3, 1), (0, 2, 3, 3)]
)
def test_text_resume_two_ranks_aligned(tmp_path, rank, workers, seed, shuffle):
    """Every document one row: every cut at a document's end, bad documents at the cuts and
    at the epoch's ends; skip counts and rows equal the uninterrupted run's after every resume."""
    rng = np.random.default_rng(seed)
    n = 36
    bad = set(int(x) for x in rng.choice(n, size=8, replace=False))
    url = write_docs(tmp_path, [4] * n, bad, 5)
    kw = dict(
        batch_size=2,
        mode="epoch",
        seed=seed,
        shuffle=shuffle,
        rank=rank,
        world_size=2,
        num_workers=workers,
        context_length=4,
    )
    n_b = 16
    ref = _uninterrupted(url, n_b, kw)
    got = _chained(url, n_b, kw)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a == b, f"batch {i}"


WORLD, WORKERS, B, C = 2, 2, 2, 4
ROW = C + 1


def _run_rank(url, rank, seed, shuffle, epochs):
    pl = pipe(
        url,
        batch_size=B,
        mode="epoch",
        seed=seed,
        shuffle=shuffle,
        rank=rank,
        world_size=WORLD,
        num_workers=WORKERS,
        context_length=C,
    )
    per_epoch, before = [], {}
    for _ in range(epochs):
        slots = {w: [] for w in range(WORKERS)}
        for i, b in enumerate(pl):
            slots[i % WORKERS].extend(b["text"].tolist())
        now = dict(pl.skipped)
        delta = {k: now.get(k, 0) - before.get(k, 0) for k in now}
        before = now
        per_epoch.append((slots, delta, len(pl)))
    return per_epoch


def _naive_bad(docs, read):
    """Bad documents inside the read stretch [0, read): those with a read token after them,
    and those at its end when it is the whole epoch."""
    total = sum(len(t) for _, t in docs)
    pos, n = 0, 0
    for _, toks in docs:
        if not toks and (pos < read or read == total):
            n += 1
        pos += len(toks)
    return n


CASES = [
    (s, sh, 5 + 2 * s, aligned) for s in range(2) for sh in (1, 3) for aligned in (False, True)
]


@pytest.mark.parametrize("seed,shuffle,per_shard,aligned", CASES)
def test_text_epoch_two_ranks_two_workers(tmp_path, seed, shuffle, per_shard, aligned):
    """aligned: every document is one row (4 tokens + eos), so every cut is at a document's
    end and bad documents sit at the cuts."""
    rng = np.random.default_rng(100 + seed)
    n = 36
    lengths = [4] * n if aligned else [int(x) for x in rng.integers(1, 7, size=n)]
    bad = set(int(x) for x in rng.choice(n, size=8, replace=False))
    url = write_docs(tmp_path, lengths, bad, per_shard)
    epochs = 2
    runs = [_run_rank(url, r, seed, shuffle, epochs) for r in range(WORLD)]
    for e in range(epochs):
        docs = naive_epoch(lengths, bad, per_shard, seed, e)
        flat = [t for _, toks in docs for t in toks]
        nb = runs[0][e][2]
        read = WORLD * nb * B * ROW
        got = [
            t for r in range(WORLD) for w in range(WORKERS) for row in runs[r][e][0][w] for t in row
        ]
        assert len(got) == read
        if shuffle == 1:
            assert got == flat[:read], f"epoch {e}"
        else:
            assert Counter(got) == Counter(flat[:read]), f"epoch {e}"
        counted = sum(runs[r][e][1].get("missing_text", 0) for r in range(WORLD))
        assert counted == _naive_bad(docs, read), f"epoch {e}"
