"""Reading WebDataset tar shards: opening (`pipe:` too), grouping members by key (the URLs:
`mmssl.data.urls`).

A sample is the run of consecutive tar members that share a key (the member path up to
the first dot of its basename, as in webdataset and img2dataset), e.g. `000123.png`,
`000123.txt`, `000123.json` -> key `000123`, files {png, txt, json}.  A compressed shard
(gzip, bzip2 or xz: any file or command output that starts with their magic bytes, as
`.tar.gz`, `.tar.bz2`, `.tar.xz` do) is read through its decompressor, as webdataset
(tarfile's "r|*") reads it; a zstd one is a counted bad_tar that says how to read it.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from typing import IO

from mmssl.data.errors import SkipCounter

Decompressed = gzip.GzipFile | bz2.BZ2File | lzma.LZMAFile  # a compressed shard's reader


class _Pipe:
    """stdout of a shell command as a readable stream; `close` reports a failed command."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd
        self.err = tempfile.TemporaryFile()
        # no stdin: a command left without its file (`cat $SHARD` with SHARD unset) would
        # otherwise wait on the terminal's input for ever
        self.proc = subprocess.Popen(
            cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.err
        )
        assert self.proc.stdout is not None
        self.stdout: IO[bytes] = self.proc.stdout
        self.ahead = b""  # read by `peek`, not yet by `read`

    def peek(self, n: int) -> bytes:
        """The next n bytes that `read` returns, fewer only at the end of the output (a
        buffered pipe's own peek returns what one write put there: maybe 1 byte)."""
        if len(self.ahead) < n:
            self.ahead += self.stdout.read(n - len(self.ahead))
        return self.ahead[:n]

    def read(self, n: int = -1) -> bytes:
        if not self.ahead:
            return self.stdout.read(n)
        if n < 0 or n > len(self.ahead):
            out, self.ahead = self.ahead, b""
            return out + self.stdout.read(-1 if n < 0 else n - len(out))
        out, self.ahead = self.ahead[:n], self.ahead[n:]
        return out

    def drain(self, limit: int = 1 << 26) -> bool:
        """Read and drop the rest of the output, so that a command still writing what
        follows the end-of-archive block (a tar's record padding: 10 KiB by default, 256 KiB
        with `tar -b 512`) ends normally instead of on a broken pipe; False when more than
        `limit` bytes remain."""
        while limit > 0:
            chunk = self.stdout.read(min(limit, 1 << 16))
            if not chunk:
                return True
            limit -= len(chunk)
        return False

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


def split_name(name: str) -> tuple[str, str]:
    """`dir/000123.seg.png` -> (`dir/000123`, `seg.png`), the webdataset key convention
    (`000123.` -> (`000123`, ``): an empty extension is a field named "")."""
    head, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


_BLOCK = 512
_PIECE = 1 << 26  # the most bytes one read asks for (`TarReader._exact`)
_ZEROS = bytes(_BLOCK)  # an end-of-archive block
_FILE_TYPES = b"07\x00"  # regular (new and old style), contiguous
_NO_DATA_TYPES = b"123456"  # hard link, symlink, char, block, directory, fifo: no data blocks
_ENC = "utf-8"  # tarfile's default name encoding on POSIX, with surrogateescape


class TarDamage(Exception):
    """The archive cannot be read on from here; `start` tells whether it failed at byte 0,
    `member` names the damaged member when its header was read."""

    def __init__(self, detail: str, start: bool = False, member: str | None = None) -> None:
        super().__init__(detail)
        self.start, self.member = start, member


def _number(field: bytes) -> int:
    """A numeric header field: NUL/space padded octal, or GNU base-256 (first byte 0x80/0xff)."""
    if field[0] in (0x80, 0xFF):
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else n
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _checksum_ok(buf: bytes, stored: int) -> bool:
    """POSIX header checksum (the chksum field counted as spaces), unsigned or signed.

    adler32's low half is (1 + byte sum) mod 65521, a byte sum at C speed; an ASCII
    header sums to at most 512 * 127 < 65521, so for those it is exact.
    """
    field = sum(buf[148:156])
    if buf.isascii():
        return (zlib.adler32(buf) & 0xFFFF) - 1 - field + 256 == stored
    unsigned = sum(buf) - field + 256
    signed = unsigned - 256 * sum(1 for b in buf[:148] + buf[156:] if b > 127)
    return stored in (unsigned, signed)


def _pax_records(data: bytes) -> dict[str, str]:
    """pax extended header records `LEN key=value\\n` -> {key: value}."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= space - pos:
            raise ValueError("bad pax record length")
        key, eq, value = data[space + 1 : pos + length - 1].partition(b"=")
        if not eq:
            raise ValueError("pax record without '='")
        out[key.decode(_ENC, "surrogateescape")] = value.decode(_ENC, "surrogateescape")
        pos += length
    return out


class TarReader:
    """Member-by-member walk of an uncompressed tar stream (ustar, GNU and pax headers).

    Replaces `tarfile`'s stream mode, which costs more than decoding a small image per
    member and keeps every member's TarInfo; only what sample grouping needs is parsed.
    `next()` returns (name, data size, is_file) or None at the end-of-archive block and
    raises TarDamage where tarfile would stop (bad or cut header, data cut short).
    """

    def __init__(self, stream: IO[bytes] | Decompressed | _Pipe, seekable: bool) -> None:
        self.read = stream.read
        self.seek = stream.seek if seekable else None  # type: ignore[union-attr]
        self.pos = 0
        self.pending = 0  # data + padding of the current member not yet consumed
        self.pax_global: dict[str, str] = {}
        self.sparse = False  # the current member is a GNU sparse file (its data unreadable)

    def _exact(self, n: int, what: str, keep: bool = True) -> bytes:
        """The next `n` bytes (b"" when not `keep`); TarDamage when the data ends first.

        A header may declare any size (a 40 KB file saying 1 TiB): one read of `n` bytes
        asked for that much memory up front (MemoryError, or OverflowError past 2**63), so
        a large `n` is read in pieces, and only the bytes that exist are held."""
        if n <= _PIECE:
            data = self.read(n)
            got = len(data)
        else:
            parts: list[bytes] = []
            got = 0
            while got < n:
                want = min(n - got, _PIECE)
                part = self.read(want)
                got += len(part)
                if keep:
                    parts.append(part)
                if len(part) < want:
                    break  # the data ended
            data = b"".join(parts)
        self.pos += got
        if got != n:
            raise TarDamage(f"{what} cut short at byte {self.pos}")
        return data if keep else b""

    def _block_data(self, size: int) -> bytes:
        data = self._exact(size + (-size % _BLOCK), "member data")
        return data[:size]

    def skip_data(self) -> None:
        """Move past the current member's data without reading it (seek when possible)."""
        n, self.pending = self.pending, 0
        if n and self.seek is not None:
            try:
                self.seek(n - 1, 1)
            except (OverflowError, OSError):  # a declared size past any file's end
                raise TarDamage(f"member data cut short at byte {self.pos}") from None
            self.pos += n - 1
            self._exact(1, "member data")  # seeking past the end does not fail by itself
        elif n:
            self._exact(n, "member data", keep=False)

    def data(self, size: int) -> bytes:
        """The current member's data, `size` bytes (its padding read and dropped)."""
        self.pending = 0
        return self._block_data(size)

    def next(self) -> tuple[str, int, bool] | None:
        """(name, data size, is_file) of the next member, skipping the unread data of the current
        one; None at the end-of-archive block; TarDamage for a bad or cut header."""
        if self.pending:
            self.skip_data()
        name: str | None = None
        pax: dict[str, str] = {}
        while True:
            start = self.pos
            buf = self.read(_BLOCK)
            self.pos += len(buf)
            if len(buf) != _BLOCK:
                if not buf:  # after whole members: a tar writer never closed, or a copy cut
                    closed = (
                        " (a tar writer not closed?)" if start and name is None and not pax else ""
                    )
                    raise TarDamage(
                        f"the data ends without the end-of-archive block{closed}", start == 0
                    )
                raise TarDamage(f"header cut short at byte {self.pos}", start == 0)
            if buf == _ZEROS:
                return None
            try:
                stored = _number(buf[148:156])
                size = _number(buf[124:136])
            except ValueError:
                raise TarDamage(f"invalid header at byte {start}", start == 0) from None
            if size < 0 or not _checksum_ok(buf, stored):
                raise TarDamage(f"invalid header at byte {start}", start == 0)
            kind = buf[156:157]
            if kind in (b"L", b"K", b"x", b"g"):  # metadata for the member that follows
                body = self._block_data(size)
                if kind == b"L":
                    name = body.split(b"\0", 1)[0].decode(_ENC, "surrogateescape")
                elif kind in (b"x", b"g"):
                    try:
                        records = _pax_records(body)
                    except ValueError:
                        raise TarDamage(f"invalid pax header at byte {start}") from None
                    (pax if kind == b"x" else self.pax_global).update(records)
                continue
            if name is None:
                name = buf[:100].split(b"\0", 1)[0].decode(_ENC, "surrogateescape")
                prefix = buf[345:500].split(b"\0", 1)[0]
                if prefix and buf[257:265] == b"ustar\x0000":
                    name = prefix.decode(_ENC, "surrogateescape") + "/" + name
            info = {**self.pax_global, **pax}
            name = info.get("path", name)
            # GNU tar -S: pax sparse formats 0.x and 1.0 (their real name in GNU.sparse.name,
            # the stored data a sparse map and the data blocks), old GNU type S (its map in
            # the header and in extension blocks while their "isextended" byte is set)
            self.sparse = kind == b"S" or any(k.startswith("GNU.sparse.") for k in pax)
            name = pax.get("GNU.sparse.name", name)
            if "size" in info:
                try:
                    size = int(info["size"])
                except ValueError:
                    size = -1
                if size < 0:
                    raise TarDamage(f"invalid pax size {info['size']!r}", member=name)
            extended = kind == b"S" and buf[482] != 0
            while extended:
                extended = self._exact(_BLOCK, "sparse header")[504] != 0
            is_file = kind in _FILE_TYPES + b"S" and not (kind == b"\x00" and name.endswith("/"))
            self.pending = 0 if kind in _NO_DATA_TYPES else size + (-size % _BLOCK)
            return name, size, is_file


_ZSTD = b"\x28\xb5\x2f\xfd"


def _decompressed(stream: IO[bytes] | _Pipe) -> Decompressed | None:
    """A gzip, bzip2 or xz reader of `stream` (buffered, so peek does not consume) when it
    starts with that format's magic bytes, else None.  Resume skips whole samples, never
    seeks to a byte offset, so the decompressed stream serves it as a plain tar does."""
    try:
        head = stream.peek(10)[:10]  # type: ignore[union-attr]  # open(..., "rb") and _Pipe have it
    except OSError:
        return None  # the reader's first read meets the error and counts it
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[arg-type]  # has read()
    if head.startswith(b"BZh") and head[4:10] == b"1AY&SY":  # as tarfile: a key may be BZh1
        return bz2.BZ2File(stream, mode="rb")  # type: ignore[call-overload]  # has read()
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(stream, mode="rb")  # type: ignore[arg-type]
    if head.startswith(_ZSTD):  # no zstd in this Python's standard library
        raise TarDamage("a zstd-compressed tar: decompress it or read it as 'pipe:zstd -dc FILE'")
    return None


def iter_shard(
    url: str, counter: SkipCounter, skip: int = 0
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) samples of one shard, after skipping the first `skip`.

    Tar-level damage is counted, not raised: a truncated or corrupt tar ends the shard
    (its complete samples are kept; a sample is complete once the next key's header or
    the end-of-archive block has been read), a failing `pipe:` command and an empty
    shard are counted too.  A sample whose key repeats the previous sample's (a file
    extension seen twice) is skipped and counted as `duplicate_key`: merged, it would
    lose one sample's files silently.  Skipped samples' data is seeked over, not read
    (decompressed and dropped, in a compressed shard).
    """
    pipe: _Pipe | None = None
    try:
        stream: IO[bytes] | _Pipe
        if url.startswith("pipe:"):
            pipe = _Pipe(url[5:])
            stream = pipe
        else:
            stream = open(url, "rb", buffering=1 << 16)  # noqa: SIM115 -- closed in finally
    except OSError as err:
        counter.add("missing_shard", url, str(err))
        return
    n = 0
    problem: tuple[str, str] | None = None  # counted once the shard is closed
    theirs = False
    finished = False
    try:
        try:
            gz = _decompressed(pipe if pipe is not None else stream)
        except TarDamage as err:  # compressed in a format this reader has no decompressor of
            problem = ("bad_tar", str(err))
            return  # (a pipe's command is stopped, its broken pipe not counted)
        # a compressed stream has no random access: data to skip is decompressed and read past
        tar = TarReader(gz or stream, seekable=pipe is None and gz is None)
        key: str | None = None
        files: dict[str, bytes] = {}
        exts: set[str] = set()  # the current sample's extensions, read or seeked over
        repeat = False  # the current sample repeats the previous sample's key
        sparse: str | None = None  # the current sample's sparse member, whose data is unread

        def finish() -> Iterator[tuple[str, dict[str, bytes]]]:
            nonlocal n
            if repeat:
                if n >= skip:
                    counter.add("duplicate_key", f"{url}:{key}", "key repeated")
                return
            if sparse is not None:  # a file of it unread: the sample is incomplete
                if n >= skip:
                    counter.add("sparse_member", f"{url}:{key}", f"{sparse}: tar -S sparse file")
                return
            if n >= skip:
                yield key, files  # type: ignore[misc]  # key is set when finish() runs
            n += 1

        try:
            while (member := tar.next()) is not None:
                name, size, is_file = member
                if not is_file:
                    continue
                k, ext = split_name(name)
                # a hidden file (macOS's `._KEY.jpg` AppleDouble) is no sample; its key
                # would be the empty text before the leading dot.  A name without a dot has
                # no key either, but `KEY.` (an empty extension) is KEY's file "", as in
                # webdataset's `base_plus_ext`
                base = os.path.basename(name)
                if "." not in base or base.startswith("."):
                    continue
                if k != key or ext in exts:
                    if key is not None:
                        yield from finish()
                    repeat = k == key
                    key, files, exts, sparse = k, {}, set(), None
                exts.add(ext)
                if tar.sparse:  # a sparse map before the data: not the file's bytes
                    sparse = name
                elif n >= skip and not repeat:
                    files[ext] = tar.data(size)
        except TarDamage as err:
            if err.member is None or split_name(err.member)[0] == key:
                key = None  # the sample being read may be incomplete: drop it
            if err.start:
                empty = str(err).startswith("the data ends") and pipe is None
                problem = ("empty_shard", "") if empty else ("bad_tar", str(err))
            else:
                problem = ("truncated_tar", str(err))
        except (EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as err:  # damaged
            key = None
            kind = "bad_tar" if tar.pos == 0 else "truncated_tar"
            problem = (kind, f"{type(gz).__name__}: {err}")
        except OSError as err:  # a read error, or a bzip2 stream damaged (BZ2File's error)
            key = None
            kind = "bad_tar" if gz is not None and tar.pos == 0 else "truncated_tar"
            problem = (kind, f"{type(gz).__name__}: {err}" if gz is not None else str(err))
        if key is not None:
            yield from finish()
        if n == 0 and problem is None:
            problem = ("empty_shard", "")
        # met before the samples this reader skips to (a slot whose part starts mid-shard):
        # the reader of that part counts it
        theirs = n < skip
        # the tar ended: let the command write the rest (or stop it, its exit then is ours)
        finished = pipe is None or problem is not None or pipe.drain()
    finally:
        if pipe is not None:
            if not finished:  # the reader stopped early: the command's broken pipe is ours
                pipe.proc.kill()
            failed = pipe.close()
            if failed and finished:
                # a reader stopped by damage mid-tar breaks the command's pipe: the damage is
                # the cause; with no tar read (bad or empty at its start) the command's failure
                if problem is None or problem[0] != "truncated_tar":
                    problem = ("pipe_error", failed)
                else:
                    problem = (problem[0], f"{problem[1]} (then the command {failed})")
        else:
            stream.close()  # type: ignore[union-attr]
        if problem is not None and not theirs:
            counter.add(problem[0], url, problem[1])


class _Events(SkipCounter):
    """Records what a reader counts, in order, without counting or logging it."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str, str]] = []

    def add(self, kind: str, where: str, detail: str = "") -> None:
        self.events.append((kind, where, detail))


def samples_for_counting(url: str, unread: SkipCounter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of one shard, as `iter_shard` gives them, for counting before the stream;
    into `unread` goes only the damage after its last sample, which the epoch's segments
    never meet: they stop at the counted samples.  That is what ends the shard (a cut or
    damaged tar, an empty one) and a key repeated after the last sample.  A key repeated
    before a sample is not counted here: the segment that holds that sample meets it and
    counts it (`iter_shard` counts a repeat once it reads the next key)."""
    met = _Events()
    for sample in iter_shard(url, met):
        met.events.clear()  # damage before this sample: the stream counts it
        yield sample
    for kind, where, detail in met.events:
        unread.add(kind, where, detail)
