"""Tokenizers stored as a Hugging Face `tokenizer.json` (the shipped byte-level BPE and user files)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmssl.tokenizer.base import Tokenizer, scrub_surrogates, sha256_file

# Fallback names when a tokenizer.json comes without tokenizer_meta.json (first match wins).
_BOS_NAMES = ("<|bos|>", "<s>", "<|startoftext|>", "<start_of_text>", "[CLS]", "<|endoftext|>")
_EOS_NAMES = ("<|eos|>", "</s>", "<|endoftext|>", "<end_of_text>", "[SEP]")
_PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` behind the mmssl interface.

    Special-token strings inside a text are encoded as ordinary text, never as special ids,
    so user text cannot forge a bos/eos; for byte-level BPE `decode(encode(s)) == s` for
    every string without lone surrogates (those become U+FFFD).  Without a tokenizer_meta.json
    the special ids are found by name (`_EOS_NAMES`, `_PAD_NAMES`, ...), registered special
    tokens first; a vocabulary without a pad token pads with eos (GPT-2's has none).
    """

    kind = "bpe"

    def __init__(
        self, path: str | Path, name: str | None = None, meta: Mapping[str, Any] | None = None
    ) -> None:
        from tokenizers import Tokenizer as _HF

        self.path = Path(path)
        self.name = name if name is not None else str(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        try:
            tok = _HF.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"cannot read tokenizer file {self.path}: {e}") from None
        tok.no_truncation()
        tok.no_padding()
        tok.encode_special_tokens = True
        self._tok = tok
        self.sha256 = sha256_file(self.path)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        if meta is not None:
            self.bos_id, self.eos_id, self.pad_id = (
                int(meta[k]) for k in ("bos_id", "eos_id", "pad_id")
            )
        else:
            self.bos_id = self._find(_BOS_NAMES, "bos")
            self.eos_id = self._find(_EOS_NAMES, "eos")
            pads = [tok.token_to_id(t) for t in self._special_first(_PAD_NAMES)]
            self.pad_id = next((int(i) for i in pads if i is not None), self.eos_id)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tok.encode_special_tokens = True  # not part of the pickled JSON

    def _special_first(self, names: Sequence[str]) -> list[str]:
        """`names`, those the file registers as special tokens first: a vocabulary may hold
        `</s>` as an ordinary piece, which would have been the eos of a GPT-2 vocabulary
        whose special `<|endoftext|>` comes later in the list."""
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        return sorted(names, key=lambda name: name not in special)  # stable: list order kept

    def _find(self, names: Sequence[str], role: str) -> int:
        for token in self._special_first(names):
            idx = self._tok.token_to_id(token)
            if idx is not None:
                return int(idx)
        raise ValueError(
            f"{self.path}: no {role} token (looked for {', '.join(names)}); "
            f"put a tokenizer_meta.json next to it"
        )

    def id_to_token(self, idx: int) -> str | None:
        """The vocabulary entry of an in-range id (used to check tokenizer_meta.json)."""
        return self._tok.id_to_token(idx)

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        try:
            encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:  # lone surrogates cannot cross into Rust
            texts = [scrub_surrogates(t) for t in texts]
            encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def _decode_ids(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
