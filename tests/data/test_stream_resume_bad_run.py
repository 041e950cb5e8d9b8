"""A stream resumed right at a window boundary does not count the restored good window
into an "all bad" run: with shards [good A, all-bad B] it reads on as an uninterrupted one
does instead of raising a false "every sample is bad" DataError."""

from __future__ import annotations

from pathlib import Path

from data_helpers import read_text_samples

from mmssl.data.errors import SkipCounter
from mmssl.data.shards import ShardWriter
from mmssl.data.stream import SampleStream, ShardSequence

N = 4  # samples in the good shard, and the shuffle window
BAD = 2  # samples in the bad shard: it ends its pass inside a window


def _seq() -> ShardSequence:
    return ShardSequence(
        2, mode="epoch", seed=0, epoch=0, rank=0, world_size=1, worker=0, num_workers=1
    )


def _urls(tmp_path: Path) -> list[str]:
    """Two shards; the one the sequence reads first is good, the other (shorter than a
    window, so the pass ends inside the window that reads it) all bad."""
    good_first = _seq()[0]
    for j in range(2):
        good = j == good_first
        with ShardWriter(str(tmp_path / f"d{j}"), "s", max_count=N) as w:
            for i in range(N if good else BAD):
                if good:
                    w.write({"__key__": f"g{j}{i}", "txt": f"good {i}"})
                else:  # undecodable text: the consumer never marks it good
                    w.write({"__key__": f"b{j}{i}", "txt": b"\xff\xfe\xfa"})
    return [str(next((tmp_path / f"d{j}").glob("*.tar"))) for j in range(2)]


def _stream(urls: list[str]) -> SampleStream:
    return SampleStream(urls, _seq(), shuffle=N, seed_key=[0, 0], counter=SkipCounter())


def test_resume_at_window_boundary_is_not_an_all_bad_run(tmp_path: Path):
    urls = _urls(tmp_path)
    ref = _stream(urls)
    first = read_text_samples(ref, N)  # window 0: all of the good shard
    assert all(k.startswith("g") for k in first)
    state = ref.state()
    want = read_text_samples(
        ref, 4 * N
    )  # the reference reads on: bad shard, then the good one again
    assert any(k.startswith("b") for k in want) and any(k.startswith("g") for k in want)

    resumed = _stream(urls)
    resumed.load_state(state)
    assert read_text_samples(resumed, 4 * N) == want
