"""A DataError in a data-loader worker reaches the caller as itself: the same type and
message as without workers, not torch's wrapper whose message is the worker's traceback;
the loader's skip counts then hold what the worker skipped before it gave up."""

from __future__ import annotations

import os

import pytest

from mmssl.data.errors import DataError
from mmssl.data.pipeline import StreamLoader, build_pipeline


def _loader(urls: str, workers: int) -> StreamLoader:
    return build_pipeline(
        urls,
        batch_size=4,
        rank=0,
        world_size=1,
        image_size=6,
        num_views=1,
        mode="resampled",
        num_workers=workers,
    )


def _first_error(loader: StreamLoader) -> str:
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    return str(caught.value)


def test_an_unreadable_source_in_a_worker_raises_the_workers_own_message(tmp_path):
    for i in range(2):
        (tmp_path / f"bad-{i:06d}.tar").write_bytes(os.urandom(3000))
    urls = str(tmp_path / "bad-{000000..000001}.tar")
    plain = _first_error(_loader(urls, workers=0))
    loader = _loader(urls, workers=1)
    from_worker = _first_error(loader)
    assert plain.startswith("no readable sample in any of 2 shards")
    assert from_worker == f"{plain} (in data-loader worker 0)"
    # the message ends with the worker's counts: "...; skipped: {'bad_tar': 3}"
    assert loader.skipped and plain.endswith(f"skipped: {loader.skipped}")


def test_without_workers_the_skip_counts_of_the_message_reach_the_loader(tmp_path):
    """num_workers=0 (the default): the error's counts are the loader's too, as with a
    worker; summary.md used to report 0 skipped beside a message that named them."""
    for i in range(2):
        (tmp_path / f"bad-{i:06d}.tar").write_bytes(os.urandom(3000))
    urls = str(tmp_path / "bad-{000000..000001}.tar")
    plain = _loader(urls, workers=0)
    message = _first_error(plain)
    assert message.startswith("no readable sample") and "data-loader worker" not in message
    assert plain.skipped and message.endswith(f"skipped: {plain.skipped}")
    worker = _loader(urls, workers=1)
    _first_error(worker)
    assert plain.skipped == worker.skipped


@pytest.mark.parametrize("workers", [0, 1])
def test_a_retry_after_the_error_counts_the_same_skips_once(tmp_path, workers):
    """The counts at the error include a batch that was never delivered: they are reported,
    not kept as the loader's position.  A second iteration (or a state saved after the
    error) starts from the last delivered batch, so it reports the same counts again rather
    than their double."""
    for i in range(2):
        (tmp_path / f"bad-{i:06d}.tar").write_bytes(os.urandom(3000))
    loader = _loader(str(tmp_path / "bad-{000000..000001}.tar"), workers)
    first = _first_error(loader)
    counts = loader.skipped
    assert counts and loader.state_dict()["workers"] == {}
    assert _first_error(loader) == first and loader.skipped == counts


@pytest.mark.slow
def test_a_script_that_ends_holding_a_worker_iterator_exits(tmp_path):
    """`it = iter(loader)` kept to the end of a script with loader workers hung at exit:
    multiprocessing's exit handler SIGTERMs its daemon children, which the workers ignore
    (a job's SIGTERM must not stop them before their rank saves), and then joins them for
    ever.  The loader's own exit handler closes such iterators first."""
    import subprocess
    import sys

    from data_helpers import write_image_shards

    urls = write_image_shards(str(tmp_path), shards=4)
    code = (
        "from mmssl.data.pipeline import build_pipeline\n"
        f"it = iter(build_pipeline({urls!r}, batch_size=4, rank=0, world_size=1, "
        "num_workers=2, image_size=8))\n"
        "next(it)\n"
        "print('one batch')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, timeout=90, capture_output=True, text=True
        )
    except subprocess.TimeoutExpired:
        raise AssertionError("the script did not exit within 90 s: its workers hung it") from None
    assert done.returncode == 0 and "one batch" in done.stdout, done.stderr[-2000:]
