"""Shard URLs: brace patterns expanded (`expand_urls`), `::`-joined lists split, local files
told from `pipe:` commands, and missing local shards named before a run starts."""

from __future__ import annotations

import os
from collections.abc import Sequence

from mmssl.data.errors import DataError


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace-expand one pattern or a list of them (`::` also separates patterns, see
    `split_patterns`); DataError naming a pattern that does not expand (unbalanced braces)."""
    from braceexpand import braceexpand

    patterns = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for pattern in patterns:
        for part in split_patterns(str(pattern)):
            try:
                expanded = list(braceexpand(part.strip()))
            except ValueError as err:  # braceexpand's UnbalancedBracesError
                why = f"shard pattern {part.strip()!r} cannot be brace-expanded: {err}"
                raise DataError(why) from None
            # "~/data/...": a local path, which the shell would have expanded unquoted
            out.extend(os.path.expanduser(u) for u in expanded)
    return out


def split_patterns(text: str) -> list[str]:
    """Split `::`-joined patterns, as webdataset does, but keep the `::` of an address.

    webdataset splits on every `::`, which cuts `pipe:curl -s http://[::1]:8000/a.tar` in
    three.  Here a `::` inside brackets (an IPv6 host in a URL) never separates, and inside
    a `pipe:` command one separates only when a `pipe:` command follows it: the command's
    own `::` (`pipe:ssh ::1 cat a.tar`) is kept.  A local pattern after a command therefore
    needs a list of patterns rather than `::`.
    """
    parts: list[str] = []
    start = depth = i = 0
    while i < len(text):
        if text[i] == "[":
            depth += 1
        elif text[i] == "]" and depth:
            depth -= 1
        elif depth == 0 and text.startswith("::", i):
            in_pipe = text[start:].lstrip().startswith("pipe:")
            if not in_pipe or text[i + 2 :].lstrip().startswith("pipe:"):
                parts.append(text[start:i])
                start = i = i + 2
                continue
        i += 1
    parts.append(text[start:])
    return parts


def is_local(url: str) -> bool:
    """Whether `url` is a local path: not `pipe:` and no `scheme://`."""
    return not url.startswith("pipe:") and "://" not in url


def _no_glob(urls: list[str]) -> str:
    """Why a URL with glob characters matched nothing, or ""."""
    if any(c in u for u in urls for c in "*?["):
        return "; mmssl expands {a..b} brace ranges, not *, ? or [] globs"
    return ""


def check_urls(pattern: str | Sequence[str], urls: list[str]) -> None:
    """Pre-flight: raise DataError when local shards are missing or unreadable (pipe: URLs
    are not checked), a URL names a scheme (http://, s3://) that only a pipe: command can
    read, or an interrupted `mmssl shards` left a split part old, part new
    (`check_publishing`)."""
    if not urls:
        raise DataError(f"shard pattern {pattern!r} expands to no URL")
    remote = next((u for u in urls if not is_local(u) and not u.startswith("pipe:")), None)
    if remote is not None:  # opened as a file, every shard would be counted as missing
        raise DataError(
            f"shard {remote!r} of {pattern!r}: only local paths and pipe: commands are read; "
            f"stream it through a command, e.g. 'pipe:curl -sfL {remote}'"
        )
    local = [u for u in urls if is_local(u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if local and len(missing) == len(local):
        raise DataError(
            f"shard pattern {pattern!r} matches no file{_no_glob(local)} (first: {missing[0]})"
        )
    if missing:
        raise DataError(
            f"{len(missing)} of {len(urls)} shards of {pattern!r} do not exist"
            f"{_no_glob(missing)} (first missing: {missing[0]})"
        )
    # a manifest counts an unreadable shard's samples into the epoch, whose other shards'
    # samples then filled its place: the epoch repeated them, with one missing_shard counted
    unreadable = [u for u in local if not os.access(u, os.R_OK)]
    if unreadable:
        raise DataError(
            f"{len(unreadable)} of {len(urls)} shards of {pattern!r} cannot be read by this "
            f"user (first: {unreadable[0]}, permission denied)"
        )
    from mmssl.data.manifest import check_publishing

    check_publishing(local)


def check_no_repeats(pattern: str | Sequence[str], urls: list[str]) -> None:
    """DataError when a shard is listed twice (the same path or command) where each shard is
    read once: an epoch read its samples twice, an evaluation counted them twice.  (Resampled
    mode draws from the list, so there a repeat weights a shard, as in webdataset.)"""
    seen: dict[str, str] = {}
    for u in urls:
        same = os.path.realpath(u) if is_local(u) else u  # a link to a listed shard too
        if same in seen:
            raise DataError(
                f"shard pattern {pattern!r} lists a shard twice ({seen[same]!r} and {u!r}), "
                f"so its samples would be read twice"
            )
        seen[same] = u
