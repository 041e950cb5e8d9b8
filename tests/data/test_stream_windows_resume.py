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
