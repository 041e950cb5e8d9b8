"""The checks of `generate`'s arguments (text and caption generation): clear errors up front
for values that would fail deep in a tensor op or silently generate the wrong thing."""

from __future__ import annotations

import numbers
import operator

import torch


def check_sampling(temperature: float, top_k: int | None, top_p: float | None = None) -> None:
    """Refuse sampling options that would fail late or silently sample the wrong thing."""
    # a negative temperature would sample from the inverted distribution (the least
    # likely tokens first) without any error, and top_k 0 fails deep in a tensor op
    ok = isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
    if not (ok and temperature >= 0 and temperature != float("inf")):  # NaN fails >= 0
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and as_top_k(top_k) is None:
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    real = isinstance(top_p, numbers.Real) and not isinstance(top_p, bool)
    if top_p is not None and not (real and 0 < top_p <= 1):  # NaN fails the comparison
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")


def as_top_k(top_k: object) -> int | None:
    """top_k as a Python int >= 1 (an int, or a numpy / torch integer scalar, through
    operator.index), or None when it is anything else: a bool, a float (2.0 included: torch.topk
    refuses it), a string, a number < 1."""
    if isinstance(top_k, bool) or (isinstance(top_k, torch.Tensor) and top_k.dtype == torch.bool):
        return None
    try:
        k = operator.index(top_k)  # type: ignore[arg-type]
    except TypeError:
        return None
    return k if k >= 1 else None


def check_vocab_limit(
    vocab_limit: object, vocab_size: int, eos_id: int | None = None
) -> int | None:
    """vocab_limit as an int in 1..vocab_size (None stays None); ValueError otherwise (a
    bool, a float, a number out of range), or when it cuts off `eos_id` (never generated,
    no row would stop)."""
    if vocab_limit is None:
        return None
    limit = as_top_k(vocab_limit)  # an integer >= 1, by the same rules as top_k
    if limit is None or limit > vocab_size:
        raise ValueError(f"vocab_limit must be an integer in 1..{vocab_size}, got {vocab_limit!r}")
    if eos_id is not None and eos_id >= limit:
        raise ValueError(f"eos_id {eos_id} is not below vocab_limit {limit}: no row could end")
    return limit


def check_max_new_tokens(max_new_tokens: int) -> None:
    """Refuse a token budget that is not an integer >= 0 (a negative one returned the prompt
    unchanged, without an error)."""
    n = max_new_tokens
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")


def check_token_id(token_id: object, vocab_size: int, name: str = "eos_id") -> None:
    """Refuse an `eos_id` (or a caption's `bos_id`) that is not a token id of the model: out
    of range, no row would ever stop; a float (2.7) or a bool, another token was used (2, 1);
    and no error said so."""
    ok = isinstance(token_id, numbers.Integral) and not isinstance(token_id, bool)
    if token_id is not None and not (ok and 0 <= token_id < vocab_size):  # type: ignore[operator]
        raise ValueError(
            f"{name} must be a token id in [0, {vocab_size}) or None, got {token_id!r}"
        )
