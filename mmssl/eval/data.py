"""Reading evaluation shards: every sample exactly once, in a fixed order, by index.

The training pipeline streams (shuffles, resamples, drops the remainder of an epoch); an
evaluation must see each sample once and know its position.  Samples are numbered in the
order of the expanded shard list, rank r of W decodes the samples with `index % W == r`,
and results are put back in index order after a gather (`mmssl.eval.features`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmssl.data.decode import (
    DEFAULT_MAX_PIXELS,
    BadSample,
    decode_fields,
    decode_image,
    decode_text,
    field_column,
    find_image,
)
from mmssl.data.errors import DataError, SkipCounter
from mmssl.data.tario import iter_shard
from mmssl.data.urls import check_no_repeats, check_urls, expand_urls


@dataclass(frozen=True)
class Preprocess:
    """How images are prepared for a model: shorter side to `image_size`, centre crop, scale to
    [0, 1], then (x - mean) / std when both are set.  Images above `max_pixels` are bad
    samples (the decoder's decompression-bomb limit: training's `data.max_pixels`)."""

    image_size: int
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        # one of the two alone used to be skipped without a word: images went in unnormalised
        if (self.mean is None) != (self.std is None):
            raise DataError(f"normalisation needs both mean and std, got {self.mean}, {self.std}")

    def __call__(self, images: list[Tensor]) -> Tensor:
        """uint8 (3, H, W) images -> float (B, 3, S, S)."""
        from mmssl.data.center import resize_center

        x = resize_center(images, self.image_size)
        if self.mean is not None and self.std is not None:
            x = (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(
                1, 3, 1, 1
            )
        return x


def shard_urls(pattern: str | Sequence[str]) -> list[str]:
    """Expand a brace pattern (or list) and check the local shards exist; DataError if not,
    or if the pattern does not expand (unbalanced braces)."""
    urls = expand_urls(pattern)
    check_urls(pattern, urls)
    check_no_repeats(pattern, urls)
    return urls


_ONE_SAMPLE = ("duplicate_key", "sparse_member")  # the reader left one sample out and went on


class _FirstProblem(SkipCounter):
    """A SkipCounter that keeps what went wrong instead of logging it: `iter_raw` raises it."""

    def __init__(self) -> None:
        super().__init__()
        self.problem: tuple[str, str] | None = None

    def add(self, kind: str, where: str, detail: str = "") -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        # damage that ends the shard outranks a repeated key met before it
        if self.problem is None or (self.problem[0] in _ONE_SAMPLE and kind not in _ONE_SAMPLE):
            self.problem = (kind, f"{where}: {detail}" if kind == "duplicate_key" else detail)


def iter_raw(urls: list[str]) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(index, key, files) of every sample of every shard, in order.

    A damaged shard (truncated or corrupt tar, failing pipe, empty) raises DataError once it
    has been read: the training stream counts and skips it, but an evaluation that lost the
    rest of a shard (of its training or its test split) would report a number for other data."""
    index = 0
    for url in urls:
        counter = _FirstProblem()
        read = 0
        for key, files in iter_shard(url, counter):
            yield index, key, files
            index += 1
            read += 1
        if counter.problem is not None:
            kind, detail = counter.problem
            if kind == "duplicate_key":  # the reader went on: what is lost is that sample
                raise DataError(
                    f"shard {url} repeats a sample's key ({detail}, a file extension seen twice: "
                    "members of two samples under one key); the repeat is left out, and "
                    "evaluating without it would measure other data than these shards (train "
                    "or test)"
                )
            if kind == "sparse_member":
                raise DataError(
                    f"shard {url} holds a GNU sparse file ({detail}) this reader cannot read; "
                    "its sample is left out, and evaluating without it would measure other "
                    "data than these shards (train or test): write the shard without tar -S"
                )
            raise DataError(
                f"shard {url} is damaged ({kind}{': ' + detail if detail else ''}); only its "
                f"first {read} sample(s) could be read, and evaluating without the rest would "
                "measure other data than these shards (train or test)"
            )
    if index == 0:
        raise DataError(f"no readable sample in {len(urls)} shard(s) (first: {urls[0]})")


def shards_hint(urls: list[str]) -> str:
    """How an error names the shards it read: the one, or the first and '...'."""
    return urls[0] if len(urls) == 1 else f"{urls[0]} ..."


def _missing_field(name: str, key: str, url_hint: str) -> DataError:
    hint = (
        " (name another json field: --label-field, or --fields for mmssl features)"
        if name == "label"
        else ""
    )
    return DataError(
        f"shards {url_hint} have no {name!r} field (first at sample {key!r}); this task needs "
        f"labelled shards{hint}"
    )


def iter_image_batches(
    urls: list[str],
    preprocess: Preprocess,
    batch_size: int,
    *,
    fields: Sequence[str] = (),
    captions: bool = False,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Batches {image (B, 3, S, S), sample_index (B,) int64, __key__, caption?, <field> (B,)}.

    Only samples with `index % world_size == rank` are decoded.  A sample without a requested
    field, without an image or (with `captions`) without a caption raises DataError: an
    evaluation that silently skipped samples would report a number for another test set.
    """
    fields = tuple(fields)
    buf: list[tuple[int, str, Tensor, str, dict[str, Any]]] = []

    def flush() -> dict[str, Any]:
        batch: dict[str, Any] = {
            "image": preprocess([b[2] for b in buf]),
            "sample_index": torch.tensor([b[0] for b in buf], dtype=torch.int64),
            "__key__": [b[1] for b in buf],
        }
        if captions:
            batch["caption"] = [b[3] for b in buf]
        for f in fields:
            batch[f] = field_column([b[4][f] for b in buf], torch.float64)
        buf.clear()
        return batch

    hint = shards_hint(urls)
    for index, key, files in iter_raw(urls):
        if limit is not None and index >= limit:
            break
        if index % world_size != rank:
            continue
        try:
            data = find_image(files)  # first: text shards have no image, not "no label field"
            meta = decode_fields(files, fields)
        except BadSample as bad:
            if bad.kind == "missing_field":
                raise _missing_field(bad.detail, key, hint) from None
            raise DataError(f"sample {key!r} of {hint}: {bad.kind} {bad.detail}") from None
        try:
            image = decode_image(data, preprocess.max_pixels)
            caption = decode_text(files) if captions else ""
        except BadSample as bad:
            raise DataError(f"sample {key!r} of {hint}: {bad.kind} {bad.detail}".rstrip()) from None
        buf.append((index, key, image, caption, meta))
        if len(buf) == batch_size:
            yield flush()
    if buf:
        yield flush()


def iter_documents(urls: list[str]) -> Iterator[str]:
    """The text of every document (txt member) of text shards, in order.  A document with no
    or empty text has no tokens to score and is passed over; one that is not UTF-8 is an
    error (its tokens would be missing from the perplexity)."""
    found = False
    for url in urls:  # one shard at a time, to name the one holding a bad document
        for _, key, files in iter_raw([url]):
            try:
                text = decode_text(files, "missing_text")
            except BadSample as bad:
                if bad.kind == "bad_text":
                    raise DataError(
                        f"document {key!r} of {url}: not UTF-8 ({bad.detail})"
                    ) from None
                continue
            found = True
            yield text
    if not found:
        raise DataError(f"no text documents in {urls[0]}{' ...' if len(urls) > 1 else ''}")
