"""Text for the batch: caption tokenisation and LM packing across document boundaries.

A tokenizer is any object with `batch_encode(texts, context_length, add_bos, add_eos)
-> (ids (B, T) int64, mask (B, T) bool)`, `encode(text, add_bos, add_eos) -> list[int]`
and `eos_id` (`mmssl.tokenizer.get_tokenizer()` returns one).

LM packing: documents are concatenated as `doc_1 + [eos] + doc_2 + [eos] + ...` and cut
into rows of `context_length + 1` tokens, so a task takes inputs `row[:, :-1]` and
targets `row[:, 1:]` and every target position is a real token (no padding, mask all
True).  A row may start in the middle of a document and span several.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def tokenize_captions(
    tokenizer: Any, texts: list[str], context_length: int
) -> tuple[Tensor, Tensor]:
    """Captions -> ids (B, T) int64 and mask (B, T) bool, T = context_length."""
    ids, mask = tokenizer.batch_encode(texts, context_length, add_bos=True, add_eos=True)
    return torch.as_tensor(ids, dtype=torch.int64), torch.as_tensor(mask, dtype=torch.bool)


class TokenPacker:
    """Packs a stream of documents into (B, context_length + 1) rows; resumable.

    `next_doc()` returns (key, text, stream state *before* that document, (start, stop)):
    the packer takes tokens [start:stop] of the document + eos (a slot of an epoch shares
    the documents at its run's two ends).  It remembers the state before its current
    document and the token offset inside it, which is all a restore needs: rewind the
    stream, re-encode that document, skip the offset.
    """

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.row = context_length + 1
        self.tokens: list[int] = []  # the current document + eos
        self.pos = 0  # next unread token in `tokens`
        self.key = ""
        self.doc_state: Any = None
        self.skip = 0  # token offset to drop after a restore

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_bos=False, add_eos=False)) + [
            int(self.tokenizer.eos_id)
        ]

    def pack(
        self, batch_size: int, next_doc: Callable[[], tuple[str, str, Any, tuple[int, Any]]]
    ) -> tuple[Tensor, list[str]]:
        """(batch_size, context_length + 1) int64 rows and the key each row starts in."""
        out = torch.empty(batch_size, self.row, dtype=torch.int64)
        keys: list[str] = []
        for b in range(batch_size):
            filled = 0
            row_key = ""
            while filled < self.row:
                if self.pos >= len(self.tokens):
                    self._pull(next_doc)
                    continue
                take = min(self.row - filled, len(self.tokens) - self.pos)
                if not row_key:
                    row_key = self.key
                out[b, filled : filled + take] = torch.tensor(
                    self.tokens[self.pos : self.pos + take]
                )
                filled += take
                self.pos += take
            keys.append(row_key)
        if self.pos >= len(self.tokens):
            # the next document now, not with the next batch: next_doc reads past the bad
            # documents after this batch's last, which the slot's last batch would leave
            # unread and uncounted (those at an epoch's end)
            self._pull(next_doc)
        return out, keys

    def _pull(self, next_doc: Callable[[], tuple[str, str, Any, tuple[int, Any]]]) -> None:
        self.key, text, self.doc_state, (start, stop) = next_doc()
        self.tokens, self.pos = self._encode(text)[start:stop], self.skip
        self.skip = 0

    def state(self, stream_state: Any) -> dict[str, Any]:
        """Position: the stream before the current document and the offset inside it."""
        if self.pos >= len(self.tokens):
            return {"stream": stream_state, "offset": 0}
        return {"stream": self.doc_state, "offset": self.pos}

    def load_state(self, state: dict[str, Any]) -> Any:
        """Restore; returns the stream state to load into the sample stream."""
        self.tokens, self.pos, self.skip = [], 0, int(state["offset"])
        return state["stream"]
