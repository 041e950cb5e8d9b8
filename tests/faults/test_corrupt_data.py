"""Corrupt data under a real 2-rank training run: random bytes as a JPEG, a PNG bomb, a
missing caption, non-UTF-8 text, a truncated tar, a zero-length shard, a shard URL that
404s and a `pipe:` command that fails.  Each bad sample is skipped, counted by kind and
logged once; the run completes; every good sample is consumed (exactly once per pass);
a source where nothing is readable stops with a clear one-line error, not a hang."""

from __future__ import annotations

import functools
import http.server
import json
import random
import re
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from data_helpers import png_bytes
from fault_helpers import Launch, key_log, wait_gone
from test_data_bad_input import _bomb_png

from mmssl.data.shards import ShardWriter

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

PER_SHARD = 6
BAD_KINDS = {  # one bad sample per good shard, by the kind it is counted as
    "bad_image": lambda rng: {"jpg": rng.randbytes(300), "txt": "random bytes"},
    "image_too_large": lambda rng: {"png": _bomb_png(), "txt": "a bomb"},
    "missing_caption": lambda rng: {"png": png_bytes(np.zeros((8, 8, 3), np.uint8))},
    "bad_text": lambda rng: {
        "png": png_bytes(np.zeros((8, 8, 3), np.uint8)),
        "txt": b"\xff\xfe\xfa",
    },
}
SHARD_KINDS = {"truncated_tar", "empty_shard"}


def _write(folder: Path) -> set[str]:
    """6 shards: 4 with one bad sample each, one truncated inside its first sample, one of
    zero bytes.  Returns the keys of the good samples."""
    rng = random.Random(0)
    writer = ShardWriter(str(folder), "s", max_count=PER_SHARD)
    good: set[str] = set()
    for shard, kind in enumerate([*BAD_KINDS, "truncated", "empty"]):
        for i in range(PER_SHARD):
            key = f"{shard}_{i:02d}"
            if i == 2 and kind in BAD_KINDS:
                writer.write({"__key__": f"bad_{key}", **BAD_KINDS[kind](rng)})
                continue
            arr = np.full((8, 8, 3), (shard * 40 + i * 5) % 256, np.uint8)
            writer.write({"__key__": key, "png": png_bytes(arr), "txt": f"sample {key}"})
            if kind in BAD_KINDS:
                good.add(key)
    writer.close()
    cut = folder / "s-000004.tar"
    cut.write_bytes(cut.read_bytes()[:700])  # inside the first member's data
    (folder / "s-000005.tar").write_bytes(b"")
    return good


def _recipe(path: Path, out: Path, name: str, source: dict, steps: int) -> Path:
    recipe = {
        "name": name,
        "out_dir": str(out),
        "model": {
            "name": "test_tiny_clip",
            "overrides": {"text": {"vocab_size": 8192, "context_length": 16}},
        },
        "data": {"sources": {"train": source}, "context_length": 16, "workers": 0},
        "objectives": {"clip": {"source": "train"}},
        "train": {"steps": steps, "global_batch_size": 8, "micro_batch_size": 4},
        "logging": {"every": 1, "tensorboard": False, "progress": False, "keys": True},
    }
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def _skipped(run_dir: Path) -> dict[str, int]:
    line = next(x for x in (run_dir / "summary.md").read_text().splitlines() if "skipped bad" in x)
    return {k: int(v) for k, v in re.findall(r"(\w+): (\d+)", line.split("(", 1)[-1])}


@pytest.fixture
def http_server(tmp_path: Path):
    """A loopback HTTP server over tmp_path/www (404 for anything missing)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_corrupt_data_two_ranks(tmp_path: Path, http_server: tuple[Path, str]) -> None:
    data = tmp_path / "data"
    good = _write(data)
    www, url = http_server
    (www / "good.tar").write_bytes((data / "s-000000.tar").read_bytes())
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for i in range(2):
        (garbage / f"g-{i:06d}.tar").write_bytes(random.Random(i).randbytes(5000))
    out = tmp_path / "runs"
    epoch = _recipe(
        tmp_path / "epoch.yaml",
        out,
        "epoch",
        {"urls": str(data / "s-{000000..000005}.tar"), "mode": "epoch", "shuffle": 4},
        steps=4,
    )
    pipes = "::".join(
        [
            f"pipe:curl -sf {url}/good.tar",
            f"pipe:curl -sf {url}/missing.tar",  # 404: curl -f exits 22
            "pipe:echo cannot reach the bucket >&2; exit 3",
        ]
    )
    piped = _recipe(tmp_path / "pipe.yaml", out, "pipe", {"urls": pipes}, steps=3)
    dead = _recipe(
        tmp_path / "dead.yaml", out, "dead", {"urls": str(garbage / "g-{000000..000001}.tar")}, 2
    )
    launch = Launch(
        [{"args": [str(epoch)]}, {"args": [str(piped)]}, {"args": [str(dead)]}], tmp_path / "l"
    )
    records = launch.wait(timeout=400)
    assert wait_gone(launch.pgid) == []
    codes = [[r["code"] for r in rank] for rank in records]
    assert codes == [[0, 0, 2], [0, 0, 2]], launch.tail()

    # epoch mode: each rank's first pass over its shards holds each of its good samples once
    first_pass: list[str] = []
    for rank in range(2):
        keys = [k for _, ks in key_log(out / "epoch", rank) for k in ks["train"]]
        assert not any(k.startswith("bad_") for k in keys)
        n = next((i for i in range(len(keys)) if keys[i] in keys[:i]), len(keys))
        assert n < len(keys), f"rank {rank} never finished a pass: {keys}"
        first_pass += keys[:n]
    assert Counter(first_pass) == Counter(good), "good samples lost or repeated in a pass"
    assert set(_skipped(out / "epoch")) == set(BAD_KINDS) | SHARD_KINDS

    # pipe: URLs: the 404 and the failing command are counted, the served shard trains
    piped_keys = {k for r in range(2) for _, ks in key_log(out / "pipe", r) for k in ks["train"]}
    assert piped_keys and piped_keys <= good
    assert _skipped(out / "pipe").get("pipe_error", 0) >= 2

    for log in launch.logs:
        text = log.read_text()
        assert "Traceback" not in text
        # logged once per kind and process, however often it was counted
        logged = Counter(re.findall(r"skipping bad input \((\w+)\)", text))
        assert logged and set(logged.values()) == {1}, logged
        errors = [x for x in text.splitlines() if x.startswith("mmssl train: error:")]
        assert len(errors) == 1 and "data.sources.train: no readable sample" in errors[0], errors
