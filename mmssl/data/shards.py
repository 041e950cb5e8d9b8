"""Writing WebDataset shards (img2dataset layout) and the `mmssl shards` command.

Each sample becomes tar members `KEY.jpg|png`, `KEY.txt`, `KEY.json` (`__key__` = KEY).
Members get fixed metadata (mtime 0, uid/gid 0, mode 0644), so the same input gives
byte-identical shards.  Shards are written under hidden `.NAME.partial` names and renamed
into place only when the whole split has been written, so a run that fails part-way leaves
an earlier run's shards and manifest as they were.  One process at a time writes a split of
a folder (a second is refused: `.split-SPLIT.lock`); writers of other splits take turns updating
the manifest (`.manifest.lock`).  `max_bytes` bounds each shard file's
size exactly (tar pads a file to 10 KiB records), except that a shard always holds at least
one sample.  Every output directory gets a `manifest.json`:
`{"version": 1, "shards": [{"url", "count", "bytes", "split"}], "splits": {split:
{"pattern": "train-{000000..000003}.tar", "count": N}}}` (shard URLs relative to it); while
a split's new shards are renamed over its old ones, `"publishing": {split: [urls]}` names them,
and readers refuse those shards (`mmssl.data.manifest`) until a rerun completes the split.
The inputs (an image folder, a CSV/JSONL table, text files) are read by
`mmssl.data.shard_inputs`; images that cannot be read (`missing_image`), do not decode
(`bad_image`) or exceed --max-pixels (`image_too_large`) are not written, and the command
prints how many of each it skipped.

    mmssl shards folder DIR --out OUT [--caption-template "a photo of a {}."]
    mmssl shards csv|jsonl TABLE --out OUT [--image-col image --caption-col caption --label-col label]
    mmssl shards text FILE ... --out OUT [--docs file|paragraph]
    common: --split train --max-count 10000 | --max-bytes 1GB
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmssl.atomic import Busy, FileLock, write_atomic
from mmssl.cliargs import ArgumentParser, summary
from mmssl.data.decode import DEFAULT_MAX_PIXELS
from mmssl.data.errors import DataError, SkipCounter
from mmssl.data.manifest import MANIFEST, PUBLISHING
from mmssl.data.shard_inputs import (
    DEFAULT_LABEL,
    samples_from_folder,
    samples_from_table,
    samples_from_text,
)
from mmssl.data.tario import split_name


def _encode(value: Any, key: str, ext: str) -> bytes:
    """The bytes of member `key`.`ext`; DataError naming the sample if it cannot be written."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list, int, float)):
        try:
            # allow_nan=False: NaN and Infinity are not JSON, and readers count them bad_json
            return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False).encode(
                "utf-8"
            )
        except ValueError as err:
            raise DataError(f"sample {key!r}: cannot write {ext} as JSON: {err}") from None
    raise DataError(f"sample {key!r}: cannot write a {type(value).__name__} into a shard ({ext})")


class ShardWriter:
    """Writes samples to `OUT/{split}-%06d.tar`, a new shard every `max_count` samples or
    `max_bytes` bytes.  `close()` renames the finished shards into place, deletes the shards
    of this split that a previous run listed and this one did not write, and records the
    shards in OUT/manifest.json; `abort()` (or leaving a `with` block by an exception)
    deletes what this writer wrote and touches nothing else."""

    def __init__(
        self,
        out_dir: str,
        split: str = "train",
        *,
        max_count: int | None = 10_000,
        max_bytes: int | None = None,
    ) -> None:
        if not re.fullmatch(r"[\w.-]+", split):
            raise DataError(f"split name must be letters, digits, '_', '-' or '.', got {split!r}")
        if (max_count is not None and max_count <= 0) or (max_bytes is not None and max_bytes <= 0):
            raise DataError(
                f"max_count and max_bytes must be positive, got {max_count}, {max_bytes}"
            )
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.split = out_dir, split
        self.max_count, self.max_bytes = max_count, max_bytes
        manifest = self._read_manifest()  # a damaged manifest fails now, not after the writing
        # one writer of a split at a time: two wrote into the same .partial files and each
        # renamed the other's half-written shards into place (writers of other splits may
        # share the folder: they take turns at the manifest)
        lock = f".split-{split}.lock"
        self._lock: FileLock | None = FileLock(os.path.join(out_dir, lock))
        try:
            self._lock.acquire(wait=False)
        except Busy:
            raise DataError(
                f"{out_dir}: another writer is writing split {split!r} there (it holds "
                f"{lock}); wait for it to end, or write elsewhere"
            ) from None
        self._clear_partials()
        # the shard names of the folder that are this tool's to replace: the manifest's, and
        # those an interrupted run marked (another tool's `train-000000.tar` is not)
        marked = (manifest.get(PUBLISHING) or {}).get(split, [])
        self._ours = {str(s.get("url")) for s in manifest["shards"]} | set(map(str, marked))
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._count = self._bytes = 0
        self._keys: set[str] = set()
        self._manifest: dict[str, Any] | None = None  # set by close()

    def _clear_partials(self) -> None:
        """Delete the `.partial` shards a killed writer of this split left (the lock says
        none is alive; its rerun would reuse only the names it writes again)."""
        pattern = re.compile(rf"\.{re.escape(self.split)}-\d{{6}}\.tar\.partial")
        for name in os.listdir(self.out_dir):
            if pattern.fullmatch(name):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.out_dir, name))

    def _partial(self, name: str) -> str:
        return os.path.join(self.out_dir, f".{name}.partial")

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        if name not in self._ours and os.path.lexists(os.path.join(self.out_dir, name)):
            self.abort()  # the shards written so far; nothing of the folder's is replaced
            raise DataError(
                f"{self.out_dir}: {name} is not in its {MANIFEST} (another tool's?): a shard of "
                f"split {self.split!r} would replace it; move it away or write elsewhere"
            )
        self._tar = tarfile.open(self._partial(name), "w", format=tarfile.GNU_FORMAT)
        self.shards.append({"url": name, "count": 0, "bytes": 0, "split": self.split})
        self._count = self._bytes = 0

    def _finish(self) -> None:
        if self._tar is not None:
            self._tar.close()
            entry = self.shards[-1]
            entry["count"] = self._count
            entry["bytes"] = os.path.getsize(self._partial(entry["url"]))
            self._tar = None

    def _file_size(self, extra: int) -> int:
        """The shard's file size with `extra` more member bytes: members, the two zero
        blocks that end the archive, padded to tar's 10 KiB record."""
        end = self._bytes + extra + 2 * tarfile.BLOCKSIZE
        return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE

    def write(self, sample: dict[str, Any]) -> None:
        """One sample: `__key__` plus extension -> bytes | str | dict | list | number."""
        key = str(sample.get("__key__", ""))
        # a key ending in '/' names hidden members (`a/.png`), which readers pass over; a NUL
        # ends the member name in the tar header
        if not key or "." in key or key.startswith("/") or key.endswith("/") or "\0" in key:
            raise DataError(
                f"sample key must be non-empty without dots, a leading or trailing '/' or NUL, "
                f"got {key!r}"
            )
        read_back = split_name(f"{key}.x")[0]
        if read_back != key:  # `a//b`: a reader's key is `a/b`, another sample's
            raise DataError(f"sample key {key!r} would be read back as {read_back!r}")
        if key in self._keys:
            raise DataError(f"duplicate sample key {key!r}")
        files = [(ext, _encode(v, key, ext)) for ext, v in sample.items() if ext != "__key__"]
        for ext, _ in files:  # `KEY.` (field "") or `KEY.a/b`: no field a reader looks up
            if not ext or "/" in ext or "\0" in ext:
                raise DataError(f"sample {key!r}: bad file extension {ext!r}")
        lowered = [ext.lower() for ext, _ in files]
        if len(set(lowered)) < len(lowered):  # readers lower-case them: `png` and `PNG` clash
            raise DataError(
                f"sample {key!r}: extensions equal but for case {sorted(e for e, _ in files)}"
            )
        if not files:  # a reader would never see it, but the manifest would count it
            raise DataError(f"sample {key!r} has no files")
        if self._manifest is not None:
            raise DataError("this ShardWriter is closed")
        self._keys.add(key)
        members = []
        for ext, data in files:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            members.append((info, data))
        # exact: the header blocks (a long name adds some) and the data padded to a block
        size = sum(
            len(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
            + -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            for info, data in members
        )
        full = self._tar is not None and (
            (self.max_count and self._count >= self.max_count)
            or (self.max_bytes and self._count and self._file_size(size) > self.max_bytes)
        )
        if self._tar is None or full:
            self._finish()
            self._open()
        assert self._tar is not None
        for info, data in members:
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size

    @property
    def pattern(self) -> str:
        """Brace-expandable pattern of the shards written, e.g. `train-{000000..000003}.tar`."""
        n = len(self.shards)
        if n <= 1:
            return f"{self.split}-000000.tar"
        return f"{self.split}-{{000000..{n - 1:06d}}}.tar"

    def _read_manifest(self) -> dict[str, Any]:
        path = os.path.join(self.out_dir, MANIFEST)
        if not os.path.isfile(path):
            return {"version": 1, "shards": [], "splits": {}}
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
            if not isinstance(manifest.get("shards"), list) or not isinstance(
                manifest.get("splits"), dict
            ):
                raise ValueError("no shards list or splits map")
        except (ValueError, AttributeError) as err:
            raise DataError(f"{path} is not a shard manifest ({err}); move it away") from None
        return manifest

    def close(self) -> dict[str, Any]:
        """Finish the last shard, rename the split's shards into place and merge it into
        OUT/manifest.json (returned).  With nothing written the manifest is left as it was."""
        if self._manifest is not None:
            return self._manifest
        try:
            self._finish()
            with FileLock(os.path.join(self.out_dir, ".manifest.lock")):
                return self._publish()
        except BaseException:
            self.abort()  # its shards not yet renamed into place are deleted
            raise
        finally:
            self._unlock()

    def _publish(self) -> dict[str, Any]:
        """close(), holding the folder's manifest lock: read, merge, write it whole."""
        manifest = self._read_manifest()  # damaged since: close() deletes this writer's shards
        if not self.shards:
            self._manifest = manifest
            return manifest
        new = {s["url"] for s in self.shards}
        old = [s for s in manifest["shards"] if s.get("split") == self.split]
        # a kill among the renames below leaves the split part new, part old (samples twice
        # or not at all): the manifest names the shards being replaced until the new one is
        # written, and readers refuse them (`check_publishing`) until a rerun completes
        marked = dict(manifest.get(PUBLISHING) or {})
        # the old shards: those of the manifest, and an interrupted run's it marked
        stale = {str(s.get("url", "")) for s in old} | set(map(str, marked.get(self.split, [])))
        marked[self.split] = sorted(new | stale)
        text = json.dumps({**manifest, PUBLISHING: marked}, indent=1, sort_keys=True) + "\n"
        write_atomic(Path(self.out_dir) / MANIFEST, text)
        for entry in self.shards:
            os.replace(self._partial(entry["url"]), os.path.join(self.out_dir, entry["url"]))
        for url in stale - new:  # a previous, longer run's shards of this split
            if os.path.basename(url) == url and url.endswith(".tar"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.out_dir, url))
        manifest["shards"] = [s for s in manifest["shards"] if s.get("split") != self.split]
        manifest["shards"] = sorted(manifest["shards"] + self.shards, key=lambda s: s["url"])
        total = sum(s["count"] for s in self.shards)
        manifest["splits"][self.split] = {"pattern": self.pattern, "count": total}
        manifest["splits"] = dict(sorted(manifest["splits"].items()))
        marked.pop(self.split)  # another split's interrupted replacement stays marked
        manifest.pop(PUBLISHING, None)
        manifest.update({PUBLISHING: marked} if marked else {})
        write_atomic(
            Path(self.out_dir) / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        )
        self._manifest = manifest
        return manifest

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def abort(self) -> None:
        """Delete the shards this writer has written so far; the directory's earlier shards
        and manifest stay as they were."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        for entry in self.shards:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._partial(entry["url"]))
        self.shards = []
        self._unlock()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def write_shards(
    samples: Iterable[dict],
    out_dir: str,
    split: str = "train",
    *,
    max_count: int | None = 10_000,
    max_bytes: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write all samples with a progress bar; returns the updated manifest.  No samples is a
    DataError, and leaves the manifest as it was."""
    from tqdm import tqdm

    # the first sample before the writer: a missing or empty input fails before the output
    # directory is created or a progress bar is drawn
    samples = iter(samples)
    first = next(samples, None)
    if first is None:
        raise DataError(f"no samples to write to {out_dir}")
    with ShardWriter(out_dir, split, max_count=max_count, max_bytes=max_bytes) as writer:
        todo = itertools.chain([first], samples)
        for sample in tqdm(todo, desc=f"{split} shards", unit=" samples", disable=not progress):
            writer.write(sample)
    return writer.close()


def _check_out_outside(out: str, root: str) -> None:
    """DataError when `out` is inside the image folder `root`: the next run read it as a
    class folder ("00_shards" sorted first: every label moved up by one)."""
    o, r = os.path.realpath(out), os.path.realpath(root)
    if o == r or o.startswith(r.rstrip(os.sep) + os.sep):
        raise DataError(
            f"--out {out} is inside the image folder {root}, whose subfolders are its classes; "
            "write the shards elsewhere"
        )


def main(argv: list[str] | None = None) -> int:
    """`mmssl shards ...`: exit code 0, or 2 on bad input."""
    parser = ArgumentParser(prog="mmssl shards", description=summary(__doc__))
    parser.add_argument(
        "input_kind",
        choices=["folder", "csv", "jsonl", "text"],
        help="folder: one subfolder per class, its images anywhere below it; csv/jsonl: a "
        "table of image paths (relative to it) and captions (an image that cannot be read "
        "or decoded is skipped and counted); text: plain text files as LM documents",
    )
    parser.add_argument("inputs", nargs="+", help="the folder, the table, or the text files")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--split", default="train", help="shard name prefix (default: train)")
    parser.add_argument(
        "--max-count",
        type=int,
        default=None,
        help="samples per shard (default: 10000 unless --max-bytes is given)",
    )
    parser.add_argument(
        "--max-bytes",
        type=_size,
        default=None,
        help="largest shard file: bytes, or with a k/m/g/t suffix in powers of 1024 "
        "(1GB = 1GiB = 1024**3 bytes)",
    )
    parser.add_argument(
        "--caption-template",
        default=None,
        help='folder: a caption with one {} for the class name, e.g. "a photo of a {}."',
    )
    parser.add_argument("--image-col", default="image", help="csv/jsonl (default: image)")
    parser.add_argument(
        "--caption-col", default="caption", help="csv/jsonl (default: caption; '' for none)"
    )
    parser.add_argument(
        "--label-col",
        default=DEFAULT_LABEL,
        help="csv/jsonl: the integer class column, an error if the table lacks it (default: "
        "'label' where present; '' for no labels)",
    )
    parser.add_argument(
        "--docs",
        choices=["file", "paragraph"],
        default="file",
        help="text: one document per file or per blank-line paragraph (default: file)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"folder/csv/jsonl: skip (and count) larger images, which training's decoder skips "
        f"at its default data.max_pixels (default: {DEFAULT_MAX_PIXELS})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    sized = args.max_count is not None or args.max_bytes is not None
    max_count = args.max_count if sized else 10_000
    skipped = SkipCounter()
    try:
        if args.max_pixels < 1:
            raise DataError(f"--max-pixels must be >= 1, got {args.max_pixels}")
        if args.input_kind == "folder":
            if len(args.inputs) != 1:
                raise DataError("folder takes exactly one image folder")
            _check_out_outside(args.out, args.inputs[0])
            samples = samples_from_folder(
                args.inputs[0], args.caption_template, skipped, args.max_pixels
            )
        elif args.input_kind in ("csv", "jsonl"):
            if len(args.inputs) != 1:
                raise DataError(f"{args.input_kind} takes exactly one table file")
            samples = samples_from_table(
                args.inputs[0],
                args.image_col,
                args.caption_col,
                args.label_col,
                kind=args.input_kind,
                skipped=skipped,
                max_pixels=args.max_pixels,
            )
        else:
            samples = samples_from_text(args.inputs, args.docs)
        manifest = write_shards(
            samples,
            args.out,
            args.split,
            max_count=max_count,
            max_bytes=args.max_bytes,
            progress=not args.quiet,
        )
    except (DataError, OSError) as err:
        print(f"mmssl shards: error: {err}", file=sys.stderr)
        return 2
    info = manifest["splits"][args.split]
    line = f"wrote {info['count']} samples to {os.path.join(args.out, info['pattern'])}"
    if skipped.counts:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(skipped.counts.items()))
        line += f"; skipped {skipped.total()} inputs ({kinds})"
    print(line)
    return 0
