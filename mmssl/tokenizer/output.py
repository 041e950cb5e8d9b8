"""Writing a trained tokenizer: its folder checked before training, its meta, its files.

`mmssl.tokenizer.train` trains; this module owns what lands in the output folder: the
artifact (tokenizer.json or tokenizer.model) and tokenizer_meta.json, which names it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from mmssl.tokenizer import ARTIFACTS
from mmssl.tokenizer.base import META_FILE, META_FORMAT
from mmssl.tokenizer.corpus import Corpus


def publish(
    out_dir: str | Path, artifact: str, data: bytes, meta: dict[str, Any]
) -> dict[str, Any]:
    """Write the tokenizer file and its meta, which names it and its sha256
    (`replace_together`, the meta last): a failed write names its file and leaves an earlier
    tokenizer there as it was; a kill between the renames leaves the new file without a meta,
    which loads as a bare file (a run that pinned the earlier one refuses its sha256).  Then
    an overwritten tokenizer of another kind goes: beside the new file without a meta, two
    tokenizer files would load as neither.  Warns when the corpus gave fewer ids than asked."""
    from mmssl.atomic import replace_together

    meta.update(artifact=artifact, sha256=hashlib.sha256(data).hexdigest())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    replace_together(
        [
            (out / artifact, lambda tmp: tmp.write_bytes(data)),
            (out / META_FILE, text),
        ]
    )
    for stale in {p for pattern in ARTIFACTS for p in out.glob(pattern)} - {out / artifact}:
        stale.unlink()
    if meta["vocab_size"] < meta["trainer"]["vocab_size"]:
        warnings.warn(
            f"{out / artifact}: {meta['vocab_size']} ids, fewer than the "
            f"{meta['trainer']['vocab_size']} asked for: the corpus has no more to merge",
            stacklevel=3,
        )
    return meta


def check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Fail before training, not after it, when `out_dir` cannot be made or written, or
    already holds a tokenizer and `overwrite` is not set (a retrained one replaced it)."""
    from mmssl.cliargs import out_dir_problem

    found = out_dir_problem(out_dir)
    if found:
        raise ValueError(f"cannot write to {out_dir}: {found[0]} {found[1]}")
    out = Path(out_dir)  # what get_tokenizer(out_dir) would load: a meta or an artifact
    held = sorted({p.name for pattern in (META_FILE, *ARTIFACTS) for p in out.glob(pattern)})
    if held and not overwrite:
        raise ValueError(
            f"{out_dir} already holds a tokenizer ({', '.join(held)}); choose another output "
            "directory, or pass --overwrite (overwrite=True) to replace it"
        )


def meta_record(
    kind: str,
    vocab_size: int,
    specials: list[str],
    corpus: Corpus,
    options: dict[str, Any],
    library: str,
) -> dict[str, Any]:
    """tokenizer_meta.json's fields but the artifact and its sha256 (`publish` adds them)."""
    return {
        "format": META_FORMAT,
        "kind": kind,
        "vocab_size": vocab_size,
        "pad_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "special_tokens": {"pad": specials[0], "bos": specials[1], "eos": specials[2]},
        "extra_special_tokens": specials[3:],
        "corpus": corpus.summary(),
        "trainer": {**options, "library": library},
    }
