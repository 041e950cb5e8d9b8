"""The one tokenizer interface: encode/decode, batch encoding to (ids, mask), metadata.

Subclasses implement `_encode_batch` (raw ids, no special tokens) and `_decode_ids`; the
special-token, truncation and padding rules live here once, so every backend pads and
truncates the same way (the CLIP text tower pools on the last True position of the mask).
"""

from __future__ import annotations

import hashlib
import operator
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

META_FILE = "tokenizer_meta.json"
META_FORMAT = 1
# Keys of `Tokenizer.metadata` that must agree between a checkpoint and a tokenizer.
MATCH_KEYS = ("kind", "vocab_size", "bos_id", "eos_id", "pad_id", "sha256")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def scrub_surrogates(text: str) -> str:
    """Make `text` encodable as UTF-8: surrogate pairs are joined, lone surrogates become U+FFFD.

    Python strings can hold lone surrogates (from `surrogateescape` decoding or bad JSON);
    UTF-8 cannot, so every backend maps them to the replacement character the same way.
    """
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def check_texts(texts: Iterable[str]) -> list[str]:
    """The texts as a list; a bare string or non-string items raise a clear TypeError.

    Any iterable is accepted, as `open_clip.tokenize` does. It is read exactly once:
    checking a generator and then encoding it would encode an empty batch.
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"expected a sequence of strings, got a single {type(texts).__name__}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
    return texts


def _token_id(i: Any) -> int:
    """An id as an int: an int, a numpy integer or a 0-d integer tensor; TypeError for a
    bool or a float (int() truncated 3.9 to 3 without a word)."""
    if isinstance(i, bool):
        raise TypeError(f"token ids must be integers, got {i!r}")
    try:
        return operator.index(i)
    except TypeError:
        raise TypeError(f"token ids must be integers, got {i!r}") from None


class Tokenizer(ABC):
    """A tokenizer with fixed special ids and a fingerprint of the artifact it was built from.

    Attributes:
        kind: backend, one of "bpe" (tokenizer.json), "sentencepiece", "clip".
        name: what `get_tokenizer` was given ("default", "clip" or a path).
        vocab_size: number of ids, special tokens included (the embedding table size).
        bos_id, eos_id, pad_id: special ids; pad_id may equal a real token (CLIP pads with 0),
            so padding is read from the mask, never from the ids.
        sha256: sha256 of the artifact file (tokenizer.json, *.model or the CLIP vocab .txt.gz).
        path: the artifact file.
    """

    kind: str
    name: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    sha256: str
    path: Path

    @abstractmethod
    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text without special tokens; texts are already type-checked."""

    @abstractmethod
    def _decode_ids(self, ids: list[int]) -> str:
        """Text of in-range ids without bos/eos/pad; drops the backend's other special tokens."""

    def id_to_token(self, idx: int) -> str | None:
        """The vocabulary entry of an in-range id (used to check tokenizer_meta.json)."""
        raise NotImplementedError(f"{type(self).__name__} cannot look up tokens")

    @property
    def special_ids(self) -> frozenset[int]:
        """The ids `decode` drops: bos, eos and pad."""
        return frozenset((self.bos_id, self.eos_id, self.pad_id))

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of one text, optionally framed by bos/eos; never truncated."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self._encode_batch([text])[0]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (N,); drops every special token. Out-of-range ids raise ValueError.

        bos/eos/pad are dropped here, the backend's other special tokens (a tokenizer.json's
        special added tokens, a sentencepiece model's control symbols) in `_decode_ids`:
        none has text of its own. CLIP's pad 0 is the real token '!' and is kept.
        """
        shape = getattr(ids, "shape", None)  # tensors and arrays
        if shape is not None and len(shape) != 1:
            raise ValueError(f"decode takes one row of ids (N,), got shape {tuple(shape)}")
        ids = [_token_id(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range for vocab_size {self.vocab_size}")
        special = self.special_ids
        return self._decode_ids([i for i in ids if i not in special])

    def batch_encode(
        self,
        texts: Iterable[str],
        context_length: int,
        add_bos: bool = True,
        add_eos: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode, truncate and pad a batch of texts (a list, tuple or any iterable of str).

        Returns ids int64 (B, T) and mask bool (B, T), T == context_length. Each row is
        [bos] + ids + [eos], cut to T tokens with eos kept as the last valid token when
        add_eos (as open_clip does), then padded with pad_id; mask is True on valid tokens.
        """
        import numpy as np
        import torch

        if isinstance(context_length, bool) or not isinstance(context_length, int):
            raise TypeError(f"context_length must be an int, got {context_length!r}")
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        texts = check_texts(texts)
        rows = self._encode_batch(texts)
        T, eos = context_length, self.eos_id
        head = [self.bos_id] if add_bos else []
        tail = [eos] if add_eos else []
        budget = T - len(head) - len(tail)  # room for text ids
        if budget >= 0:
            # equals cutting head + ids + tail to T and putting eos last
            kept = [head + ids[:budget] + tail for ids in rows]
        else:  # T == 1 with both bos and eos: eos wins
            kept = [[eos] for _ in rows]
        lengths = np.fromiter(map(len, kept), dtype=np.int64, count=len(kept))
        mask_np = np.arange(T) < lengths[:, None]  # (B, T)
        ids_np = np.full((len(kept), T), self.pad_id, dtype=np.int64)  # (B, T)
        # scatter the flat ids: converting only real tokens beats padding lists in Python
        ids_np[mask_np] = np.fromiter(chain.from_iterable(kept), np.int64, int(lengths.sum()))
        return torch.from_numpy(ids_np), torch.from_numpy(mask_np)

    @property
    def metadata(self) -> dict[str, Any]:
        """What a checkpoint config records to detect a mismatched tokenizer later."""
        return {
            "kind": self.kind,
            "name": self.name,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "sha256": self.sha256,
        }

    def check_matches(self, expected: Mapping[str, Any]) -> None:
        """Raise ValueError naming every field where `expected` (a saved metadata dict) differs."""
        mine = self.metadata
        diffs = [
            f"{k}: expected {expected[k]!r}, got {mine[k]!r}"
            for k in MATCH_KEYS
            if k in expected and expected[k] != mine[k]
        ]
        if diffs:
            raise ValueError(f"tokenizer {self.name!r} does not match: " + "; ".join(diffs))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})"
        )
