"""Key/value cache for incremental causal decoding: each new token runs one position.

`KVCache(depth, max_len)` holds one `LayerKVCache` per Block; `Transformer.forward(...,
kv_cache=cache)` hands layer i its own, and each self-attention appends the keys and values
of the positions it just ran, then attends over everything cached so far.

The cache is exact only while earlier positions stay as they were: a causal stack, no
sliding window (sliding past the context moves every position), and the same condition for
every call.  `TextTransformer.generate` decides when to use it.  `reorder(index)` picks (or
repeats) batch rows, as beam search does with each step's parent beams.

A cross-attention layer (caption decoders) keeps the keys and values of its context (the
image tokens) in `LayerKVCache.context`: computed by the first call, reused by every later
one.  They are valid only while the context is the same tensor for the whole caption (rows
reordered by `reorder` as the context's are): a new image needs a new cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class ContextKVCache:
    """The keys and values (B, H, N, d) a cross-attention layer projects from its context
    (B, N, Dc): projected by the first `keys_values` call, then returned as they are."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def keys_values(
        self,
        context: torch.Tensor,
        project: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """context (B, N, Dc) -> the cached keys and values, from `project(context)` once."""
        if self.k is None or self.v is None:
            self.k, self.v = project(context)
        elif (self.k.shape[0], self.k.shape[-2]) != tuple(context.shape[:2]):
            raise ValueError(
                f"the context k/v cached for (B, N) = ({self.k.shape[0]}, {self.k.shape[-2]}) "
                f"met a context of {tuple(context.shape[:2])}: one cache per context"
            )
        return self.k, self.v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` of the batch: see `LayerKVCache.reorder`."""
        if self.k is None or self.v is None:
            return
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)


class LayerKVCache:
    """The keys and values (B, H, L, d) of one self-attention layer, in a buffer of max_len
    positions, and `context`: those of the layer's cross-attention, if it has one."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.context = ContextKVCache()

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, H, n, d) of the new positions -> all cached keys and values (B, H, L + n, d)."""
        n = k.shape[-2]
        if self.length + n > self.max_len:
            raise ValueError(f"kv cache holds {self.max_len} positions, got {self.length} + {n}")
        if self.k is None or self.v is None:
            # one buffer for the whole run: appending by torch.cat would copy it every token
            b, h, _, d = k.shape
            self.k = k.new_empty(b, h, self.max_len, d)
            self.v = v.new_empty(b, h, self.max_len, v.shape[-1])
        elif k.shape[:2] != self.k.shape[:2] or k.shape[-1] != self.k.shape[-1]:
            # the slice assignment would broadcast a batch-1 step into every cached row
            raise ValueError(
                f"kv cache holds (B, H, d) = {tuple(self.k.shape[:2]) + (self.k.shape[-1],)}, "
                f"got keys {tuple(k.shape)}"
            )
        end = self.length + n
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (R,) int64 of the batch, in that order: new row i is old row
        index[i].  R may differ from B (a beam search expands B prompts to B * beams rows
        once, then picks each step's parents)."""
        self.context.reorder(index)
        if self.k is None or self.v is None:
            return
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)


class KVCache:
    """One LayerKVCache per Block of a Transformer; `length` is the number of positions cached."""

    def __init__(self, depth: int, max_len: int):
        self.layers = [LayerKVCache(max_len) for _ in range(depth)]

    @property
    def length(self) -> int:
        """Positions cached so far (0 for a cache of no layers)."""
        return self.layers[0].length if self.layers else 0

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder (or expand) the batch rows of every layer: see `LayerKVCache.reorder`."""
        for layer in self.layers:
            layer.reorder(index)
