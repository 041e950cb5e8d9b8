"""Reading the `manifest.json` that `mmssl shards` (`mmssl.data.shards.ShardWriter`) writes
beside its shards: their sample counts, for epoch mode (`manifest_counts`), and the shards an
interrupted run was replacing, which readers refuse (`check_publishing`)."""

from __future__ import annotations

import json
import os

from mmssl.data.errors import DataError

MANIFEST = "manifest.json"
PUBLISHING = "publishing"  # {split: [shard urls]} a `mmssl shards` is replacing


def check_publishing(urls: list[str]) -> None:
    """DataError for a local shard whose folder's manifest marks it as being replaced: a
    `mmssl shards` was killed while it renamed a split's new shards over the old ones, and
    the split is part one run's, part the other's."""
    from mmssl.data.urls import is_local

    local = [os.path.abspath(u) for u in urls if is_local(u)]
    for d in sorted({os.path.dirname(u) for u in local}):
        try:
            with open(os.path.join(d, MANIFEST), encoding="utf-8") as f:
                marked = json.load(f).get(PUBLISHING) or {}
            marked = {
                split: {os.path.join(d, str(u)) for u in names} for split, names in marked.items()
            }
        except (OSError, ValueError, AttributeError, TypeError):
            continue  # none, or not one `mmssl shards` wrote: its own readers say so
        for split, names in marked.items():
            hit = sorted(names.intersection(local))
            if hit:
                raise DataError(
                    f"{hit[0]}: an `mmssl shards` run was stopped while it replaced split "
                    f"{split!r} of {d} (its manifest.json says so): its shards are part the "
                    "new run's, part the old one's; run that `mmssl shards` command again"
                )


def manifest_counts(urls: list[str]) -> dict[str, int]:
    """Sample counts by absolute shard path from the manifest.json files next to the local
    shards (as `ShardWriter` writes them), for epoch mode.  A shard whose size is not the
    manifest's `bytes` (rewritten since) is left out with a warning, so that it is counted by
    reading it: its stale count made an epoch repeat or drop samples, silently.  A rewrite
    to the very same size (tar pads to 10 KiB records: 17 and 18 small samples can match)
    goes unseen: write the manifest again with the shards (`mmssl shards` does)."""
    from mmssl.data.errors import log
    from mmssl.data.urls import is_local

    counts: dict[str, int] = {}
    for d in sorted({os.path.dirname(os.path.abspath(u)) for u in urls if is_local(u)}):
        path = os.path.join(d, MANIFEST)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
            shards = manifest.get("shards", [])
            if not isinstance(shards, list):
                raise ValueError("'shards' is not a list")
            for shard in shards:
                count, size = shard["count"], shard.get("bytes")
                if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                    raise ValueError(f"count {count!r} of {shard['url']!r}")
                url = os.path.join(d, str(shard["url"]))
                if size is not None and os.path.isfile(url) and os.path.getsize(url) != size:
                    log.warning(
                        "%s: %s is %d bytes, the manifest says %s: counting its samples by "
                        "reading it",
                        path,
                        shard["url"],
                        os.path.getsize(url),
                        size,
                    )
                    continue
                counts[url] = count
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            what = f"no {err}" if isinstance(err, KeyError) else str(err)
            raise DataError(
                f"{path} is not a shard manifest ({what}); epoch mode takes the sample counts "
                f"from it: move it away (the shards are then counted) or set the source's "
                f"epoch_batches (in a recipe: data.sources.NAME.epoch_batches)"
            ) from None
    return counts
