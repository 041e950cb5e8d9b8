"""What the ranks of one run draw, built rank by rank in one process: the same source for
each batch (the objectives and their collectives run per source), but their own crops,
flips and jitter, and their own shuffle order; in epoch mode the ranks' and workers' runs
partition the epoch, also when the workers of a rank need different counts (an odd number
of batches) and with two sources.  A fourth mutation audit (distributed paths) found each of
these unchecked: the tests built rank 0 only, or compared keys alone."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest
import torch
from data_helpers import png_bytes, write_image_shards

from mmssl.data.pipeline import Source, build_pipeline
from mmssl.data.stream import ShardSequence


@pytest.fixture()
def shards(tmp_path) -> str:
    return write_image_shards(str(tmp_path / "s"))


@pytest.mark.parametrize("mode", ["resampled", "epoch"])
def test_every_rank_takes_the_same_source_for_a_batch(shards: str, mode: str) -> None:
    kw = dict(batch_size=2, world_size=2, shuffle=1, image_size=8, num_views=0, mode=mode)

    def sources(rank: int) -> list[str]:
        two = [Source(shards, name="a"), Source(shards, name="b", weight=1.0)]
        return [
            b["source"] for b in itertools.islice(build_pipeline(sources=two, rank=rank, **kw), 12)
        ]

    first = sources(0)
    assert first == sources(1) and len(set(first)) == 2


def test_ranks_draw_their_own_augmentations(shards: str) -> None:
    kw = dict(batch_size=4, world_size=2, image_size=8, num_views=2, return_image=False)
    first = [
        next(iter(build_pipeline(sources=[Source(shards, name="a")], rank=r, **kw))) for r in (0, 1)
    ]
    # the crop columns of the descriptor (centre, size) of the first view
    assert not torch.equal(first[0]["aug"][0][:, 8:12], first[1]["aug"][0][:, 8:12])


def test_ranks_shuffle_in_their_own_order(shards: str) -> None:
    from mmssl.data.producer import StreamDataset

    orders = []
    for rank in (0, 1):
        pl = build_pipeline(
            sources=[Source(shards, name="a")], rank=rank, batch_size=4, world_size=2,
            image_size=8, num_views=0, mode="epoch", shuffle=8,
        )  # fmt: skip
        ds = StreamDataset(pl.plan)
        next(iter(ds))
        orders.append(list(ds.current.streams["a"].order))
    assert orders[0] != orders[1]


def test_epoch_runs_partition_the_epoch_when_workers_need_different_counts() -> None:
    counts = [7, 7, 7, 7, 7, 7, 7, 1]  # 50 samples
    ranks, workers = 2, 2
    need = [12, 8] * ranks  # 5 batches of 4 a rank: its worker 0 takes 3, worker 1 takes 2
    seen: collections.Counter = collections.Counter()
    for r in range(ranks):
        for w in range(workers):
            seq = ShardSequence(
                len(counts), mode="epoch", seed=0, epoch=0, rank=r, world_size=ranks,
                worker=w, num_workers=workers, shard_counts=counts, need=need,
            )  # fmt: skip
            assert sum(b - a for a, b in seq.bounds) >= need[r * workers + w], (r, w)
            for shard, (a, b) in zip(seq.mine, seq.bounds):
                seen.update((shard, i) for i in range(a, b))
    assert len(seen) == sum(counts) and max(seen.values()) == 1


def test_an_odd_number_of_batches_a_rank_repeats_no_sample(tmp_path) -> None:
    from mmssl.data.shards import ShardWriter

    w = ShardWriter(str(tmp_path), "u", max_count=7)
    for i in range(44):  # 44 // (2 ranks x 4) = 5 batches a rank: its workers need 3 and 2
        w.write({"__key__": f"u{i:03d}", "png": png_bytes(np.zeros((8, 8, 3), np.uint8))})
    w.close()
    keys = []
    for rank in range(2):
        pl = build_pipeline(
            f"{tmp_path}/{w.pattern}", kind="image", batch_size=4, mode="epoch", rank=rank,
            world_size=2, num_workers=2, image_size=8, num_views=0, shuffle=5,
        )  # fmt: skip
        keys += [k for b in pl for k in b["__key__"]]
    assert len(keys) == 40 and len(set(keys)) == 40


def test_two_sources_odd_batches_repeat_no_sample_in_an_epoch(shards: str) -> None:
    keys = []
    for rank in (0, 1):
        pl = build_pipeline(
            sources=[Source(shards, name="a"), Source(shards, name="b")], rank=rank,
            batch_size=3, world_size=2, num_workers=3, image_size=8, num_views=0,
            mode="epoch", shuffle=5,
        )  # fmt: skip
        keys += [(b["source"], k) for b in pl for k in b["__key__"]]
    assert keys and len(keys) == len(set(keys))
