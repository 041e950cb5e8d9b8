"""Each shuffle window draws its own order; a synthetic stream resumes at the saved batch."""

from __future__ import annotations

from pathlib import Path

import torch

from mmssl.data.errors import SkipCounter
from mmssl.data.shards import ShardWriter
from mmssl.data.stream import SampleStream, ShardSequence


def _stream(tmp_path: Path, n: int = 48, shuffle: int = 8) -> SampleStream:
    with ShardWriter(str(tmp_path), "train", max_count=n) as w:
        for i in range(n):
            w.write({"__key__": f"s{i:04d}", "txt": f"doc {i}"})
    urls = sorted(str(p) for p in tmp_path.glob("**/*.tar"))
    seq = ShardSequence(
        len(urls), mode="epoch", seed=0, epoch=0, rank=0, world_size=1, worker=0, num_workers=1
    )
    return SampleStream(urls, seq, shuffle=shuffle, seed_key=[0, 0], counter=SkipCounter())


def test_each_shuffle_window_has_its_own_order(tmp_path: Path):
    s = _stream(tmp_path)
    keys = [int(s.next()[0][1:]) for _ in range(48)]
    patterns = {tuple(k - min(keys[w : w + 8]) for k in keys[w : w + 8]) for w in range(0, 48, 8)}
    assert len(patterns) > 1, "every window was shuffled by the same permutation"


def test_synthetic_stream_resumes_at_the_saved_batch():
    from mmssl.train.streams import SyntheticStream

    a = SyntheticStream("image", 4, 8, 0, 8, 16, seed=3, rank=0)
    for _ in range(3):
        a.next()
    state = a.state_dict()
    want = a.next()
    b = SyntheticStream("image", 4, 8, 0, 8, 16, seed=3, rank=0)
    b.load_state_dict(state)
    got = b.next()
    assert torch.equal(got["image"], want["image"]) and torch.equal(got["label"], want["label"])


def test_resampled_slots_draw_their_own_shards() -> None:
    """Each (rank, worker) slot draws its own shard sequence: with a key without the worker,
    both workers of a rank drew the same shards and every sample was read twice."""
    kw = dict(mode="resampled", seed=0, epoch=0, world_size=2, num_workers=2)
    draws = [
        [ShardSequence(64, rank=r, worker=w, **kw)[k] for k in range(64)]  # type: ignore[arg-type]
        for r in (0, 1)
        for w in (0, 1)
    ]
    for i, a in enumerate(draws):
        for b in draws[i + 1 :]:
            # independent uniform draws over 64 shards agree at ~1 of 64 positions
            assert sum(x == y for x, y in zip(a, b)) < 16


def test_an_epoch_slot_reads_its_own_segments_twice_then_whole_shards() -> None:
    """Epoch mode with a run of samples: the two passes over the slot's own part read only
    its segments of each shard (others' samples are theirs); later passes whole shards."""
    seq = ShardSequence(
        4, mode="epoch", seed=0, epoch=0, rank=0, world_size=2, worker=0, num_workers=1,
        shard_counts=[5, 5, 5, 5], run=(2, 7),
    )  # fmt: skip
    assert seq.bounds is not None
    n = len(seq.bounds)
    assert [seq.span(k) for k in range(2 * n)] == seq.bounds * 2
    assert seq.bounds != [(0, 5)] * n  # the run cuts its shards
    assert seq.span(2 * n) == (0, None)
