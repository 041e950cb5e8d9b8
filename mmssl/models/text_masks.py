"""The masks of a text batch: which tokens are real (`text_mask`, right-padded captions) and
which are a prompt's (`prompt_mask`, left-padded for generation)."""

from __future__ import annotations

import torch


def last_valid_index(text_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True of each row.  text_mask: (B, T) bool -> (B,) int64."""
    t = text_mask.shape[1]
    positions = torch.arange(t, device=text_mask.device).expand_as(text_mask)
    return torch.where(text_mask, positions, -1).amax(dim=1).clamp(min=0)


def as_text_mask(text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor | None:
    """`text_mask` as a (B, T) bool tensor of `text`'s shape (True = valid token), or None.

    A 0/1 integer or float mask (Hugging Face's `attention_mask`) is read as nonzero = valid,
    as the losses read it.  ValueError for another shape: a (1, T) mask broadcast one row's
    padding to every row, a shorter one pooled before the end of the text."""
    if text_mask is None:
        return None
    if not isinstance(text_mask, torch.Tensor):
        raise TypeError(f"text_mask must be a tensor, got {type(text_mask).__name__}")
    if tuple(text_mask.shape) != tuple(text.shape):
        raise ValueError(
            f"text_mask must have the text's shape {tuple(text.shape)}, "
            f"got {tuple(text_mask.shape)}"
        )
    return text_mask if text_mask.dtype == torch.bool else text_mask != 0


def text_mask_faults(text_mask: torch.Tensor) -> torch.Tensor:
    """(2, B) bool on the mask's device: rows with no valid token, and left-padded rows (the
    first column padding, a later one valid).  For one host sync with the caller's other
    checks.  A False inside a row is no padding to refuse: open_clip's `text != 0` marks
    CLIP's "!" (id 0) so, and a causal tower reads such a row as it did before."""
    empty = ~text_mask.any(dim=1)
    left_padded = ~text_mask[:, 0] & text_mask.any(dim=1)
    return torch.stack([empty, left_padded])


def raise_left_padded(left_padded: torch.Tensor) -> None:
    """ValueError naming the rows of a text_mask that start with padding.

    Positions count from each row's first column and a causal token attends to the padding
    before it, so such a row's features are not those of its text alone (cosine 0.71 in a
    review): right-pad, or pass a left-padded batch to `logits`/`generate` as token_mask or
    prompt_mask."""
    if bool(left_padded.any()):
        rows = left_padded.nonzero().flatten().tolist()
        raise ValueError(
            f"text_mask rows {rows[:8]} are left-padded (padding before the text): pad text "
            "on the right (tokenizer padding_side='right')"
        )


def trim_padding(
    text: torch.Tensor,
    text_mask: torch.Tensor | None,
    multiple: int = 8,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop the trailing columns that are padding in every row: (B, T) -> (B, T') with T'
    the last valid column + 1, rounded up to a multiple of `multiple` (fewer shapes for
    compiled blocks), at most T, and not rounded past `limit` (the context length: 10 real
    tokens of a 12-token context were refused as "text length 16").  One host sync.

    Exact for `TextTransformer`: a valid token never attends to the padding after it (causal
    attention, or masked keys), and pooling reads valid positions only.  Captions are short
    next to CLIP's 77-token context, so this skips most of a caption batch's text tower.
    """
    if text_mask is None:
        return text, None
    cols = torch.nonzero(text_mask.any(dim=0))
    last = int(cols.max()) + 1 if len(cols) else 1
    keep = min(text.shape[1], -(-last // multiple) * multiple)
    if limit is not None:
        keep = min(keep, max(last, limit))
    if keep == text.shape[1]:
        return text, text_mask
    return text[:, :keep], text_mask[:, :keep]


def check_prompt_mask(prompt_mask: torch.Tensor, text: torch.Tensor) -> None:
    """Refuse a prompt mask that is not (B, T0) bool, left-padded, with a real token per row.

    Left-padded: each row's padding (False) comes before its tokens (True), so that the new
    tokens, appended on the right, follow the prompt directly.  One host sync.
    """
    if not isinstance(prompt_mask, torch.Tensor) or prompt_mask.dtype != torch.bool:
        what = prompt_mask.dtype if isinstance(prompt_mask, torch.Tensor) else type(prompt_mask)
        raise ValueError(f"prompt_mask must be a bool tensor (True = real token), got {what}")
    if prompt_mask.shape != text.shape:
        raise ValueError(
            f"prompt_mask must have the prompt's shape {tuple(text.shape)}, "
            f"got {tuple(prompt_mask.shape)}"
        )
    if prompt_mask.device != text.device:
        raise ValueError(f"prompt_mask is on {prompt_mask.device}, the prompt on {text.device}")
    empty = ~prompt_mask.any(dim=1)
    # left-padded: never a real token followed by padding
    right_padded = (prompt_mask[:, :-1] & ~prompt_mask[:, 1:]).any(dim=1)
    bad = torch.stack([empty, right_padded]).cpu()  # one sync for both checks
    if bool(bad[0].any()):
        rows = bad[0].nonzero().flatten().tolist()
        raise ValueError(f"prompt_mask rows {rows} have no real token (all False)")
    if bool(bad[1].any()):
        rows = bad[1].nonzero().flatten().tolist()
        raise ValueError(
            f"prompt_mask rows {rows} are not left-padded (a real token before padding); "
            "pad prompts on the left (tokenizer padding_side='left')"
        )
