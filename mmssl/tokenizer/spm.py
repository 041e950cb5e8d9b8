"""SentencePiece `.model` files behind the mmssl interface."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmssl.tokenizer.base import Tokenizer, scrub_surrogates, sha256_file


class SentencePieceTokenizer(Tokenizer):
    """A `sentencepiece.SentencePieceProcessor` loaded from the model file's bytes.

    Special ids come from tokenizer_meta.json when present, else from the model itself
    (its pad id, or eos when the model has no pad).
    """

    kind = "sentencepiece"

    def __init__(
        self, path: str | Path, name: str | None = None, meta: Mapping[str, Any] | None = None
    ) -> None:
        self.path = Path(path)
        self.name = name if name is not None else str(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        self._proto = self.path.read_bytes()
        self._sp = self._load(self._proto, self.path)
        self.sha256 = sha256_file(self.path)
        self.vocab_size = int(self._sp.get_piece_size())
        if meta is not None:
            self.bos_id, self.eos_id, self.pad_id = (
                int(meta[k]) for k in ("bos_id", "eos_id", "pad_id")
            )
        else:
            bos, eos, pad = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
            if bos < 0 or eos < 0:
                raise ValueError(f"{self.path}: the model has no bos/eos id; train it with both")
            self.bos_id, self.eos_id = int(bos), int(eos)
            self.pad_id = int(pad) if pad >= 0 else self.eos_id

    @staticmethod
    def _load(proto: bytes, path: Path) -> Any:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a C++ message
            raise ValueError(f"cannot read sentencepiece model {path}: {e}") from None
        return sp

    def __getstate__(self) -> dict[str, Any]:
        # the SWIG processor does not pickle on every version; rebuild it from the bytes
        state = dict(self.__dict__)
        del state["_sp"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._sp = self._load(self._proto, self.path)

    def id_to_token(self, idx: int) -> str | None:
        """The piece of an in-range id (used to check tokenizer_meta.json)."""
        return self._sp.id_to_piece(idx)

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        try:
            return self._sp.encode(texts, out_type=int)
        except (TypeError, UnicodeEncodeError):  # lone surrogates are not UTF-8
            return self._sp.encode([scrub_surrogates(t) for t in texts], out_type=int)

    def _decode_ids(self, ids: list[int]) -> str:
        return self._sp.decode(ids)
