"""Tokenizer training corpora: text files, JSONL, WebDataset .tar shards, and the default's.

`Corpus` wraps any iterable of texts and records what a trainer consumed (count,
characters, sha256), which goes into tokenizer_meta.json.
"""

from __future__ import annotations

import hashlib
import json
import platform
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mmssl.tokenizer.base import scrub_surrogates


class Corpus:
    """An iterable of texts that counts and hashes what the trainer consumed."""

    def __init__(self, texts: Iterable[str], description: str, total: int | None = None) -> None:
        self.texts, self.description, self.total = texts, description, total
        self.num_texts = self.num_chars = 0
        self._digest = hashlib.sha256()

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError:
                # JSON escapes can hold lone surrogates, which neither trainer accepts; train
                # on the text that encoding will see (Tokenizer.encode scrubs them the same way)
                text = scrub_surrogates(text)
                data = text.encode("utf-8")
            self.num_texts += 1
            self.num_chars += len(text)
            self._digest.update(data + b"\0")
            yield text

    def summary(self) -> dict[str, Any]:
        """What the trainer consumed so far: description, num_texts, num_chars and sha256 (for
        tokenizer_meta.json)."""
        return {
            "description": self.description,
            "num_texts": self.num_texts,
            "num_chars": self.num_chars,
            "sha256": self._digest.hexdigest(),  # of the texts, each followed by a NUL byte
        }


def default_corpus() -> Corpus:
    """pydoc_data.topics (every topic, sorted by key) then the demo's caption corpus."""
    from pydoc_data.topics import topics

    from mmssl.data.captions import caption_corpus

    captions = caption_corpus()
    texts = [topics[k] for k in sorted(topics)] + captions
    description = (
        f"pydoc_data.topics of Python {platform.python_version()} ({len(topics)} topics in "
        f"sorted key order) + mmssl.data.captions.caption_corpus() ({len(captions)} captions)"
    )
    return Corpus(texts, description, total=len(texts))


# What a directory contributes; other files there (a shard folder's manifest.json, READMEs,
# images) are not training text. A file named explicitly is read whatever its name.
# Tar shards are the suffixes the data pipeline reads (mmssl.data.tario): plain, gzip,
# bzip2, xz; tarfile's "r|*" opens each.
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
DIR_SUFFIXES = (".txt", ".jsonl") + TAR_SUFFIXES


def expand_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """(files, skipped) named by `inputs`.

    Directories expand, in sorted order, to their files ending in one of `DIR_SUFFIXES`;
    their other non-hidden files are returned as `skipped` so the caller can report them.
    """
    files: list[Path] = []
    skipped: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if not p.is_file() or p.name.startswith("."):
                    continue
                (files if p.name.lower().endswith(DIR_SUFFIXES) else skipped).append(p)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    if not files:
        what = ", ".join(map(str, inputs)) or "(nothing given)"
        note = f" (skipped {len(skipped)} not {'/'.join(DIR_SUFFIXES)})" if skipped else ""
        raise ValueError(f"no input files in {what}{note}")
    return files, skipped


def _not_utf8(path: Path) -> str:
    """The error for a file that failed to decode: where its first non-UTF-8 byte is.

    The text reader's UnicodeDecodeError holds an offset into the chunk it was decoding,
    not into the file, so the file is read again as bytes. A UTF-8 character never contains
    a newline byte, so each line decodes on its own and the first failure is the file's.
    """
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                where = f"byte {offset + e.start}, line {lineno}"
                return f"{path}: not UTF-8 text ({e.reason} at {where})"
            offset += len(raw)
    return f"{path}: not UTF-8 text"  # the file changed between the two reads


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The non-empty lines of a text file, each with its line number in the file."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if line:
                    yield lineno, line
    except UnicodeDecodeError:
        raise ValueError(_not_utf8(path)) from None


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    for lineno, line in _iter_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise ValueError(f"{path}:{lineno}: no field {field!r}")
        if not isinstance(record[field], str):
            raise ValueError(f"{path}:{lineno}: field {field!r} is not a string")
        if record[field]:
            yield record[field]


def _iter_tar(path: Path, tar_field: str) -> Iterator[str]:
    # WebDataset naming: "dir/KEY.FIELD" where FIELD is everything after the first dot
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if not member.isfile() or "." not in base:
                    continue
                if base.split(".", 1)[1].lower() != tar_field.lower():
                    continue
                data = tar.extractfile(member)
                raw = data.read() if data is not None else b""
                try:
                    text = raw.decode(
                        "utf-8-sig"
                    )  # a byte-order mark dropped, as training reads it
                except UnicodeDecodeError:
                    raise ValueError(f"{path}:{member.name}: not UTF-8 text") from None
                if text:
                    yield text
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{path}: cannot read tar shard ({e})") from None


def iter_corpus(
    inputs: Sequence[str | Path], field: str = "text", tar_field: str = "txt"
) -> Iterator[str]:
    """Texts of text files (per line), .jsonl files (`field`) and .tar shards (`tar_field`).

    Directories contribute only their .txt, .jsonl and tar files (see `expand_inputs`).
    """
    for path in expand_inputs(inputs)[0]:
        name = path.name.lower()
        if name.endswith(TAR_SUFFIXES):
            yield from _iter_tar(path, tar_field)
        elif name.endswith(".jsonl"):
            yield from _iter_jsonl(path, field)
        else:
            yield from (line for _, line in _iter_lines(path))
