"""TextTransformer: a causal language model and the pooled text embedding of a CLIP text tower."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.models.config import TextConfig
from mmssl.models.trunk import build_trunk
from mmssl.nn import KVCache, Norm, RotaryEmbedding, Transformer


def last_valid_index(text_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True of each row.  text_mask: (B, T) bool -> (B,) int64."""
    t = text_mask.shape[1]
    positions = torch.arange(t, device=text_mask.device).expand_as(text_mask)
    return torch.where(text_mask, positions, -1).amax(dim=1).clamp(min=0)


def trim_padding(
    text: torch.Tensor, text_mask: torch.Tensor | None, multiple: int = 8
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop the trailing columns that are padding in every row: (B, T) -> (B, T') with T'
    the last valid column + 1, rounded up to a multiple of `multiple` (fewer shapes for
    compiled blocks), at most T.  One host sync.

    Exact for `TextTransformer`: a valid token never attends to the padding after it (causal
    attention, or masked keys), and pooling reads valid positions only.  Captions are short
    next to CLIP's 77-token context, so this skips most of a caption batch's text tower.
    """
    if text_mask is None:
        return text, None
    cols = torch.nonzero(text_mask.any(dim=0))
    last = int(cols.max()) + 1 if len(cols) else 1
    keep = min(text.shape[1], -(-last // multiple) * multiple)
    if keep == text.shape[1]:
        return text, text_mask
    return text[:, :keep], text_mask[:, :keep]


def check_sampling(temperature: float, top_k: int | None) -> None:
    """Refuse sampling options that would fail late or silently sample the wrong thing."""
    # a negative temperature would sample from the inverted distribution (the least
    # likely tokens first) without any error, and top_k 0 fails deep in a tensor op
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not 1 <= top_k):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run `module` in eval mode (no dropout), then restore each submodule's own mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def sample_tokens(
    next_logits: Callable[[torch.Tensor], torch.Tensor],
    text: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    eos_id: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The decoding loop shared by every generator: text (B, T0) -> (B, T0 + max_new_tokens).

    next_logits: the whole sequence so far (B, T) -> logits (B, V) of the token after it.
    temperature 0 is greedy; top_k keeps the k most likely tokens.  Rows that emitted
    `eos_id` keep emitting it, and once every row has, the rest is filled with it without
    calling `next_logits` again.
    """
    total = text.shape[1] + max_new_tokens
    done = torch.zeros(text.shape[0], dtype=torch.bool, device=text.device)
    for _ in range(max_new_tokens):
        logits = next_logits(text).float()  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(dim=-1)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = logits.softmax(dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        text = torch.cat([text, nxt[:, None]], dim=1)
        if eos_id is not None and bool(done.all()):
            break
    if text.shape[1] < total:  # every row ended: the documented shape, filled with eos
        text = F.pad(text, (0, total - text.shape[1]), value=eos_id)  # type: ignore[arg-type]
    return text


class TextTransformer(nn.Module):
    """Token ids (B, T) -> hidden states (B, T, D), LM logits (B, T, V) and a pooled embedding.

    Padding is on the right and `text_mask` (B, T) marks valid tokens.  With causal attention a
    token never sees the padding after it, so no mask is needed inside the trunk; a
    bidirectional text tower masks padded keys.
    """

    def __init__(
        self, cfg: TextConfig, embed_dim: int | None = None, trunk: Transformer | None = None
    ):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.token_embed = nn.Embedding(cfg.vocab_size, d)
        self.pos_embed = (
            nn.Parameter(torch.zeros(cfg.context_length, d)) if cfg.pos_embed == "learned" else None
        )
        self.rope = RotaryEmbedding(d // cfg.num_heads) if cfg.pos_embed == "rope" else None
        self.trunk = trunk or build_trunk(
            d,
            cfg.depth,
            cfg.num_heads,
            cfg.block,
            causal=cfg.causal,
            grad_checkpointing=cfg.grad_checkpointing,
        )
        self.norm = Norm(d, cfg.block.norm, cfg.block.norm_eps)
        self.lm_head = (
            nn.Linear(d, cfg.vocab_size, bias=False)
            if cfg.lm_head and not cfg.tie_embeddings
            else None
        )
        self.proj = nn.Linear(d, embed_dim, bias=False) if embed_dim else None

    def forward_tokens(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """text: (B, T) int64 -> final-normed hidden states (B, T, D).

        prefix: optional (B, P, D) embeddings run before the text (a caption prefix); they get
        no text position and are dropped from the output.
        kv_cache: `text` continues the `kv_cache.length` tokens already run (causal towers
        only); its positions start there, and the cache gets its keys and values.
        """
        # a single unbatched row or tokenizer output left as floats would otherwise fail deep
        # in the embedding; out-of-vocabulary ids are left to it (checking them syncs a GPU)
        if text.ndim != 2:
            raise ValueError(f"text must be (B, T) token ids, got shape {tuple(text.shape)}")
        if text.is_floating_point() or text.is_complex() or text.dtype == torch.bool:
            raise TypeError(f"text must be integer token ids (int64), got {text.dtype}")
        b, t = text.shape
        start = 0
        if kv_cache is not None:
            if not self.cfg.causal or prefix is not None or text_mask is not None:
                raise ValueError("a kv cache needs a causal text tower, no prefix, no text_mask")
            start = kv_cache.length
        if start + t > self.cfg.context_length:
            raise ValueError(
                f"text length {start + t} exceeds context_length {self.cfg.context_length}"
            )
        x = self.token_embed(text)  # (B, T, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed[start : start + t].to(x.dtype)
        num_prefix = 0
        if prefix is not None:
            num_prefix = prefix.shape[1]
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        attn_mask = None
        if text_mask is not None and not self.cfg.causal:
            keys = F.pad(text_mask, (num_prefix, 0), value=True)
            attn_mask = keys[:, None, None, :]  # (B, 1, 1, P + T)
        rope = None
        if self.rope is not None:
            rope = self.rope(torch.arange(start, start + t, device=text.device))
        x = self.trunk(
            x, is_causal=self.cfg.causal, attn_mask=attn_mask, rope=rope, kv_cache=kv_cache
        )
        return self.norm(x[:, num_prefix:])

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., D) -> logits (..., V), through the tied embedding by default."""
        return F.linear(hidden, self.head_weight())

    def head_weight(self) -> torch.Tensor:
        """The (V, D) weight `head` multiplies by: lm_head's, or the tied token embedding."""
        if self.lm_head is not None:
            return self.lm_head.weight
        if not self.cfg.lm_head:
            raise RuntimeError("this text tower was built with lm_head=false")
        return self.token_embed.weight

    def logits(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits (B, T, V): position t predicts token t + 1."""
        return self.head(self.forward_tokens(text, text_mask, prefix))

    def pool(self, hidden: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        """hidden (B, T, D) -> (B, D): the end-of-text token (last valid), or the masked mean."""
        if text_mask is None:
            text_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        if self.cfg.pool == "mean":
            w = text_mask.to(hidden.dtype).unsqueeze(-1)
            return (hidden * w).sum(1) / w.sum(1).clamp(min=1)
        return hidden[
            torch.arange(hidden.shape[0], device=hidden.device), last_valid_index(text_mask)
        ]

    def forward_features(
        self, text: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """text (B, T) -> pooled (B, D) and tokens (B, T, D)."""
        tokens = self.forward_tokens(text, text_mask)
        return {"pooled": self.pool(tokens, text_mask), "tokens": tokens}

    def encode(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """text (B, T) -> (B, E): pooled features through the projection, if any.  Runs
        without the all-padding trailing columns (`trim_padding`)."""
        text, text_mask = trim_padding(text, text_mask)
        pooled = self.forward_features(text, text_mask)["pooled"]
        return self.proj(pooled) if self.proj is not None else pooled

    forward = encode

    @torch.no_grad()
    def generate(
        self,
        text: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample a continuation of a prompt.  text: (B, T0) -> (B, T0 + max_new_tokens).

        temperature 0 is greedy decoding.  Rows that emitted `eos_id` keep emitting it, and
        once every row has, the rest is filled with it without running the model.
        Runs in eval mode (no dropout) and restores each module's mode afterwards.
        A causal tower keeps a kv cache, so each new token runs one position.  The prompt
        window slides when it grows past context_length; sliding moves every position, so
        from then on each token reruns the whole window, as does a bidirectional tower.
        """
        check_sampling(temperature, top_k)
        with eval_mode(self):
            return self._generate(text, max_new_tokens, temperature, top_k, eos_id, generator)

    def _generate(
        self,
        text: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        eos_id: int | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        ctx = self.cfg.context_length
        cache = KVCache(len(self.trunk.blocks), ctx) if self.cfg.causal else None

        def next_logits(text: torch.Tensor) -> torch.Tensor:
            if cache is not None and text.shape[1] <= ctx:
                hidden = self.forward_tokens(text[:, cache.length :], kv_cache=cache)
            else:
                hidden = self.forward_tokens(text[:, -ctx:])
            return self.head(hidden[:, -1])

        return sample_tokens(
            next_logits, text, max_new_tokens, temperature, top_k, eos_id, generator
        )

    def flops_per_token(self) -> float:
        """Forward FLOPs per token at full context (2 per multiply-add), LM head included."""
        c = self.cfg
        per_block = 2 * c.dim * c.dim * (4 + 2 * c.block.mlp_ratio) + 4 * c.context_length * c.dim
        head = 2 * c.dim * c.vocab_size if c.lm_head else 0
        return c.depth * per_block + head
