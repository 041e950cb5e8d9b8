"""Reading WebDataset tar shards: URL expansion, opening (`pipe:` too), grouping by key.

A sample is the run of consecutive tar members that share a key (the member path up to
the first dot of its basename, as in webdataset and img2dataset), e.g. `000123.png`,
`000123.txt`, `000123.json` -> key `000123`, files {png, txt, json}.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from typing import IO

from mmssl.data.errors import DataError, SkipCounter


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace-expand one pattern or a list of them (`::` also separates patterns)."""
    from braceexpand import braceexpand

    patterns = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for pattern in patterns:
        for part in str(pattern).split("::"):
            out.extend(braceexpand(part.strip()))
    return out


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def check_urls(pattern: str | Sequence[str], urls: list[str]) -> None:
    """Pre-flight: raise DataError when local shards are missing (pipe: URLs are not checked)."""
    if not urls:
        raise DataError(f"shard pattern {pattern!r} expands to no URL")
    local = [u for u in urls if is_local(u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if local and len(missing) == len(local):
        raise DataError(f"shard pattern {pattern!r} matches no file (first: {missing[0]})")
    if missing:
        raise DataError(
            f"{len(missing)} of {len(urls)} shards of {pattern!r} do not exist "
            f"(first missing: {missing[0]})"
        )


class _Pipe:
    """stdout of a shell command as a readable stream; `close` reports a failed command."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=self.err)
        assert self.proc.stdout is not None
        self.stdout: IO[bytes] = self.proc.stdout

    def read(self, n: int = -1) -> bytes:
        return self.stdout.read(n)

    def close(self) -> str | None:
        """Wait for the command; return an error message if it failed."""
        self.stdout.close()
        code = self.proc.wait()
        self.err.seek(0)
        msg = self.err.read().decode("utf-8", "replace").strip().splitlines()
        self.err.close()
        if code != 0:
            return f"`{self.cmd}` exited with {code}" + (f": {msg[-1]}" if msg else "")
        return None


class _EofWatch:
    """A read-only stream that remembers whether the data ran out (a read returned b"").

    tarfile ends a stream quietly when a header is missing, so a tar cut at a block
    boundary would look complete; a complete archive ends with zero blocks before EOF.
    """

    def __init__(self, raw: IO[bytes] | _Pipe) -> None:
        self.raw = raw
        self.eof = False

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if not data and n != 0:
            self.eof = True
        return data


def split_name(name: str) -> tuple[str, str]:
    """`dir/000123.seg.png` -> (`dir/000123`, `seg.png`), the webdataset key convention."""
    head, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_shard(
    url: str, counter: SkipCounter, skip: int = 0
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) samples of one shard, after skipping the first `skip`.

    Tar-level damage is counted, not raised: a truncated or corrupt tar ends the shard
    (its complete samples are kept), a failing `pipe:` command and an empty shard are
    counted too.
    """
    pipe: _Pipe | None = None
    try:
        stream: IO[bytes] | _Pipe
        if url.startswith("pipe:"):
            pipe = _Pipe(url[5:])
            stream = pipe
        else:
            stream = open(url, "rb")  # noqa: SIM115 -- closed in finally
    except OSError as err:
        counter.add("missing_shard", url, str(err))
        return
    n = 0
    problem: tuple[str, str] | None = None  # counted once the shard is closed
    finished = False
    try:
        try:
            watch = _EofWatch(stream)
            tf = tarfile.open(fileobj=watch, mode="r|")  # type: ignore[call-overload]
        except tarfile.ReadError as err:
            empty = pipe is None and os.path.getsize(url) == 0
            problem = ("empty_shard", "") if empty else ("bad_tar", str(err))
            finished = True
            return
        key: str | None = None
        files: dict[str, bytes] = {}
        try:
            for member in tf:
                if not member.isfile():
                    continue
                k, ext = split_name(member.name)
                if not ext or os.path.basename(k).startswith("."):
                    continue
                data = tf.extractfile(member).read()  # type: ignore[union-attr]
                if k != key:
                    if key is not None:
                        if n >= skip:
                            yield key, files
                        n += 1
                    key, files = k, {}
                files[ext] = data
        except (tarfile.TarError, EOFError, OSError) as err:
            # the sample being read when the data ended is incomplete: drop it
            problem = ("truncated_tar", str(err))
            key = None
        if problem is None and watch.eof and n > 0:
            problem = ("truncated_tar", "the data ends without the end-of-archive blocks")
            key = None  # its last member may be missing: drop that sample
        if key is not None:
            if n >= skip:
                yield key, files
            n += 1
        if n == 0 and problem is None:
            problem = ("empty_shard", "")
        finished = True
    finally:
        if pipe is not None:
            if not finished:  # the reader stopped early: the command's broken pipe is ours
                pipe.proc.kill()
            failed = pipe.close()
            if failed and finished:
                problem = ("pipe_error", failed)
        else:
            stream.close()  # type: ignore[union-attr]
        if problem is not None:
            counter.add(problem[0], url, problem[1])


def count_samples(url: str) -> int:
    """Number of samples in a local shard (reads headers and data once)."""
    return sum(1 for _ in iter_shard(url, SkipCounter()))
