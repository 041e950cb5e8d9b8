"""Invariants of the streaming pipeline that a mutation audit found untested: chained
resumes, skip counts across epochs and resumes, the block-shuffle window, disjoint ranks
when bad samples eat the spares, the all-bad detector, no repeat before every sample once,
and the version-2 draw key.  Each compares with an independent reference: the
uninterrupted run, or a naive count / enumeration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from bad_input_helpers import _good
from data_helpers import read_text_samples, write_image_shards

from mmssl.data.pipeline import Source, build_pipeline
from mmssl.data.shards import ShardWriter


def _keys(b):
    return (b["source"], tuple(b["__key__"]))


# ---------------------------------------------------------------- chained resumes, mixture
@pytest.mark.parametrize("mode", ["resampled", "epoch"])
def test_a_chain_of_resumes_continues_every_source(tmp_path, mode):
    """Save and restore after every batch (a job preempted often): each restore must continue
    exactly the uninterrupted stream, also for a source that drew no batch since the last
    restore (its saved position must be carried into the next state)."""
    a = write_image_shards(str(tmp_path / "a"), shards=4, per_shard=6)
    b = write_image_shards(str(tmp_path / "b"), shards=4, per_shard=6)
    kw = dict(
        sources=[Source(a, name="a", weight=1.0), Source(b, name="b", weight=1.0)],
        batch_size=2, mode=mode, seed=5, shuffle=3, rank=0, world_size=1,
        num_workers=0, image_size=8, num_views=0, return_image=False,
    )  # fmt: skip
    n = 10
    ref = [_keys(x) for x in itertools.islice(build_pipeline(**kw), n)]
    assert len({s for s, _ in ref}) == 2
    got, state = [], None
    for _ in range(n):
        pl = build_pipeline(**kw)
        if state is not None:
            pl.load_state_dict(state)
        got.append(_keys(next(iter(pl))))
        state = pl.state_dict()
    assert got == ref


# ---------------------------------------------------------------- skip counts across epochs
def _bad_shards(tmp_path) -> str:
    """2 shards of 6; samples 1 and 8 have no caption (bad for image_text)."""
    w = ShardWriter(str(tmp_path), "s", max_count=6)
    for i in range(12):
        s = _good(i)
        if i in (1, 8):
            del s["txt"]
        w.write(s)
    w.close()
    return str(tmp_path / "s-{000000..000001}.tar")


def _counts(pl, n):
    it, out = iter(pl), []
    for _ in range(n):
        try:
            next(it)
        except StopIteration:  # the epoch's end: the next iter() is the next epoch
            it = iter(pl)
            next(it)
        out.append(pl.skipped.get("missing_caption", 0))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_counts_survive_a_resume_across_epochs(tmp_path, workers):
    """`loader.skipped` sums finished epochs: a restore at (and after) an epoch's end reports
    what the uninterrupted run reports, which is 2 bad samples per finished epoch."""
    urls = _bad_shards(tmp_path)
    kw = dict(batch_size=2, mode="epoch", seed=1, shuffle=3, rank=0, world_size=1,
              num_workers=workers, image_size=6, num_views=0, return_image=False)  # fmt: skip
    per_epoch = len(build_pipeline(urls, **kw))
    n = 3 * per_epoch
    ref = _counts(build_pipeline(urls, **kw), n)
    # independent: every bad sample is counted once an epoch, by the end of that epoch
    for e in range(3):
        assert ref[(e + 1) * per_epoch - 1] == 2 * (e + 1)
    for cut in range(1, n):
        head = build_pipeline(urls, **kw)
        _counts(head, cut)
        tail = build_pipeline(urls, **kw)
        tail.load_state_dict(head.state_dict())
        assert _counts(tail, n - cut) == ref[cut:], cut


# ---------------------------------------------------------------- the block-shuffle window
@pytest.mark.parametrize("shuffle", [2, 5, 7])
def test_block_shuffle_windows_hold_shuffle_samples(tmp_path, shuffle):
    """`shuffle` is the window in samples (DESIGN / build_pipeline docstring): naive block
    shuffle reference: emission j*shuffle..(j+1)*shuffle-1 is a permutation of raw samples
    in that block, and with shuffle >= 2 some window is actually reordered."""
    w = ShardWriter(str(tmp_path), "s", max_count=28)
    for i in range(28):
        w.write(_good(i))
    w.close()
    pl = build_pipeline(str(tmp_path / "s-000000.tar"), kind="image_text", batch_size=1,
                        mode="epoch", seed=2, shuffle=shuffle, rank=0, world_size=1,
                        num_workers=0, image_size=6, num_views=0, return_image=False)  # fmt: skip
    got = [int(b["__key__"][0][1:]) for b in pl]
    assert sorted(got) == list(range(28))
    blocks = [got[j : j + shuffle] for j in range(0, 28, shuffle)]
    for j, blk in enumerate(blocks):
        assert sorted(blk) == list(range(j * shuffle, min(28, (j + 1) * shuffle))), (j, blk)
    assert any(blk != sorted(blk) for blk in blocks)


# ---------------------------------------------------------------- ranks stay disjoint
@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_stay_disjoint_when_bad_samples_eat_the_spares(tmp_path, workers):
    """stream.py docstring: a slot that reads past its own part (bad samples ate its spares)
    reads its own part once more, so ranks stay disjoint.  4 shards of 6 with one bad
    sample each, 2 ranks x batch 2: each rank needs 12, holds 10 good in its run, re-reads
    2 of its own.  Reference: every key a rank yields is one of its own run's samples, i.e.
    the ranks' key sets are disjoint and together hold each good sample."""
    w = ShardWriter(str(tmp_path), "s", max_count=6)
    for i in range(24):
        s = _good(i)
        if i % 6 == 2:
            del s["txt"]
        w.write(s)
    w.close()
    urls = str(tmp_path / "s-{000000..000003}.tar")
    sets, total = [], 0
    for rank in range(2):
        pl = build_pipeline(urls, batch_size=2, mode="epoch", seed=0, shuffle=3, rank=rank,
                            world_size=2, num_workers=workers, image_size=6, num_views=0,
                            return_image=False)  # fmt: skip
        keys = [k for b in pl for k in b["__key__"]]
        assert len(keys) == 12
        sets.append(set(keys))
        total += pl.skipped.get("missing_caption", 0)
    assert not sets[0] & sets[1], sorted(sets[0] & sets[1])
    assert sets[0] | sets[1] == {f"g{i:04d}" for i in range(24) if i % 6 != 2}
    assert total == 4


# ---------------------------------------------------------------- the all-bad detector
def test_a_bad_run_starting_mid_shard_does_not_count_that_shard_as_all_bad(tmp_path):
    """Shards [A: good, good, bad, bad] and [B: bad x 3], windows of 2, whole shards.  A bad
    run that starts inside A (window A[2:4]) has not read A whole: A's good samples come
    again on the next pass, so this is no "every sample is bad" source.  Reference: a naive
    consumer reads on and gets A's good samples again."""
    from mmssl.data.errors import SkipCounter
    from mmssl.data.stream import SampleStream, ShardSequence

    def seq():
        return ShardSequence(2, mode="epoch", seed=0, epoch=0, rank=0, world_size=1,
                             worker=0, num_workers=1)  # fmt: skip

    first = seq()[0]
    urls = []
    for j in range(2):
        mixed = j == first
        with ShardWriter(str(tmp_path / f"d{j}"), "s", max_count=4) as w:
            for i in range(4 if mixed else 3):
                good = mixed and i < 2
                w.write({"__key__": f"{'g' if good else 'b'}{j}{i}",
                         "txt": f"good {i}" if good else b"\xff\xfe\xfa"})  # fmt: skip
        urls.append(str(next((tmp_path / f"d{j}").glob("*.tar"))))
    s = SampleStream(urls, seq(), shuffle=2, seed_key=[0, 0], counter=SkipCounter())
    keys = read_text_samples(s, 12)
    assert sum(k.startswith("g") for k in keys) >= 4  # A's good samples, pass after pass


# ---------------------------------------------------------------- no repeat before all once
@pytest.mark.parametrize("seed", range(8))
def test_a_slot_emits_every_good_sample_of_its_run_before_a_repeat(tmp_path, seed):
    """stream.py: "a window never spans two passes over the shards, so an epoch-mode worker
    emits all of its samples once before it repeats any".  One shard of 12 with 3 bad
    samples, batch 5: 2 batches need 10, the run holds 9 good, so exactly one repeat.
    Reference: the epoch yields all 9 good samples plus one of them again."""
    w = ShardWriter(str(tmp_path), "s", max_count=12)
    bad = {0, 6, 11}
    for i in range(12):
        s = _good(i)
        if i in bad:
            del s["txt"]
        w.write(s)
    w.close()
    pl = build_pipeline(str(tmp_path / "s-000000.tar"), batch_size=5, mode="epoch",
                        seed=seed, shuffle=5, rank=0, world_size=1, num_workers=0,
                        image_size=6, num_views=0, return_image=False)  # fmt: skip
    keys = [k for b in pl for k in b["__key__"]]
    assert len(keys) == 10
    assert set(keys) == {f"g{i:04d}" for i in range(12) if i not in bad}, sorted(keys)
    assert pl.skipped == {"missing_caption": 3}


# ---------------------------------------------------------------- version-2 resampled draws
def test_source_0_resampled_draws_keep_the_version_2_key():
    """pipeline.STATE_VERSION notes: version 2 states of single-source resampled runs still
    load, which holds only if source 0 draws exactly what version 2 drew.  Reference: version
    2's draw, written out: rng([seed, rank, worker, 0x5A3D, block]).integers(0, n, 1024)."""
    from mmssl.data.stream import ShardSequence

    for seed, rank, worker in [(0, 0, 0), (3, 1, 2)]:
        seq = ShardSequence(17, mode="resampled", seed=seed, epoch=0, rank=rank, world_size=2,
                            worker=worker, num_workers=3, source=0)  # fmt: skip
        for block in (0, 2):
            old = np.random.default_rng([seed, rank, worker, 0x5A3D, block]).integers(0, 17, 1024)
            assert [seq[block * 1024 + i] for i in range(0, 1024, 97)] == [
                int(x) for x in old[::97]
            ]


def test_a_mixture_epoch_orders_its_sources_anew_each_epoch(tmp_path):
    """Epoch mode with two sources: each epoch holds every source's batches (its
    epoch_batches), in an order drawn per epoch, as samples are reshuffled per epoch."""
    a = write_image_shards(str(tmp_path / "a"), shards=2, per_shard=4)
    b = write_image_shards(str(tmp_path / "b"), shards=2, per_shard=4)
    pl = build_pipeline(
        sources=[Source(a, name="a", epoch_batches=6), Source(b, name="b", epoch_batches=6)],
        batch_size=1, mode="epoch", seed=0, rank=0, world_size=1, num_workers=0,
        image_size=8, num_views=0, return_image=False,
    )  # fmt: skip
    orders = [pl.plan.schedule(epoch).tolist() for epoch in range(4)]
    assert all(sorted(o) == [0] * 6 + [1] * 6 for o in orders)
    assert len({tuple(o) for o in orders}) > 1
