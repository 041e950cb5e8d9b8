"""A shard this user cannot read is a start-up error.  It passed the pre-flight (which
checked existence only); with a manifest its samples still counted into the epoch, whose
other shards' samples then filled its place: 12 of 48 delivered twice, and one
`missing_shard` in the metrics.  Root reads any file, so as root the check runs in a forked
child that has become the unprivileged uid 65534 (python itself may be unreachable to that
user: everything is imported before the fork)."""

from __future__ import annotations

import os
import shutil
import tempfile

from data_helpers import write_image_shards

from mmssl.data.errors import DataError
from mmssl.data.pipeline import build_pipeline


def _build(pattern: str) -> str:
    try:
        build_pipeline(pattern, batch_size=2, rank=0, world_size=1, mode="epoch")
    except DataError as err:
        return f"DataError: {err}"
    return "no error"


def _as_other_user(pattern: str) -> str:
    """`_build(pattern)` as uid 65534 when this process is root, else as this user."""
    if os.geteuid() != 0:
        return _build(pattern)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, report, and leave without pytest's cleanup
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, _build(pattern).encode())
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            os.write(write, f"child failed: {err!r}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        said = f.read()
    os.waitpid(pid, 0)
    return said


def test_an_unreadable_shard_is_a_start_up_error() -> None:
    root = tempfile.mkdtemp(prefix="mmssl-unreadable-")  # reachable by another user
    try:
        os.chmod(root, 0o755)
        pattern = write_image_shards(root)
        assert os.path.isfile(os.path.join(root, "manifest.json"))  # the case that repeated
        assert _as_other_user(pattern) == "no error"  # readable: builds
        shard = os.path.join(root, sorted(f for f in os.listdir(root) if f.endswith(".tar"))[2])
        os.chmod(shard, 0)
        said = _as_other_user(pattern)
        assert said.startswith("DataError: 1 of 8 shards of ") and said.endswith(
            f"cannot be read by this user (first: {shard}, permission denied)"
        ), said
    finally:
        shutil.rmtree(root, ignore_errors=True)
