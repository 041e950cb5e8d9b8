"""TextTransformer: a causal language model and the pooled text embedding of a CLIP text tower."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.models.beam import beam_search, check_beam
from mmssl.models.config import TextConfig
from mmssl.models.gen_args import (
    check_max_new_tokens,
    check_sampling,
    check_token_id,
    check_vocab_limit,
)
from mmssl.models.text_masks import (
    as_text_mask,
    check_prompt_mask,
    last_valid_index,
    raise_left_padded,
    text_mask_faults,
    trim_padding,
)
from mmssl.models.trunk import build_trunk
from mmssl.nn import KVCache, Norm, RotaryEmbedding, Transformer


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


_GREEDY_BELOW = 1.0 / torch.finfo(torch.float32).max  # ~2.9e-39


def sample_tokens(
    next_logits: Callable[[torch.Tensor], torch.Tensor],
    text: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    eos_id: int | None,
    generator: torch.Generator | None,
    top_p: float | None = None,
) -> torch.Tensor:
    """The decoding loop shared by every generator: text (B, T0) -> (B, T0 + max_new_tokens).

    next_logits: the whole sequence so far (B, T) -> logits (B, V) of the token after it.
    temperature 0 is greedy; top_k keeps the k most likely tokens, then top_p the fewest
    most likely tokens whose probability (after the temperature) reaches top_p, as Hugging
    Face's TopPLogitsWarper after its temperature and top-k ones.  Rows that emitted
    `eos_id` keep emitting it, and once every row has, the rest is filled with it without
    calling `next_logits` again.
    """
    total = text.shape[1] + max_new_tokens
    if top_k is not None:
        top_k = operator.index(top_k)  # a numpy / torch integer scalar as an int for topk
    done = torch.zeros(text.shape[0], dtype=torch.bool, device=text.device)
    for _ in range(max_new_tokens):
        logits = next_logits(text).float()  # (B, V)
        if temperature < _GREEDY_BELOW:  # 0, or a 1 / T that float32 cannot hold: greedy,
            nxt = logits.argmax(dim=-1)  # the limit of sampling as T -> 0
        else:
            drop = None
            if top_k is not None:  # chosen before the temperature, which can round them equal
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                drop = logits < kth
            # the max taken out first: a tiny temperature sends the others to -inf, not the
            # top to +inf (inf - inf is a NaN softmax); the distribution is the same
            logits = (logits - logits.amax(dim=-1, keepdim=True)) * (1.0 / temperature)
            if drop is not None:
                logits = logits.masked_fill(drop, float("-inf"))
            probs = logits.softmax(dim=-1)
            if top_p is not None:
                probs = nucleus(probs, top_p)
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


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs (B, V) cut to each row's nucleus (Holtzman et al. 2020): the most likely tokens
    until their mass reaches top_p (at least one), the others set to 0 (multinomial takes
    unnormalised weights).  top_p 1 keeps every token (a float32 cumsum can reach 1 early)."""
    if top_p >= 1:
        return probs
    ranked, order = probs.sort(dim=-1, descending=True)
    before = ranked.cumsum(dim=-1) - ranked  # the mass of the tokens ranked above each
    drop = before >= top_p
    drop[:, 0] = False
    return probs.masked_fill(drop.scatter(-1, order, drop), 0.0)


def _check_not_empty(text: torch.Tensor) -> None:
    if text.ndim == 2 and text.shape[1] == 0:  # else an amax error deep in the pooling
        raise ValueError(f"text has no tokens: shape {tuple(text.shape)}")


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
        *,
        token_mask: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """text: (B, T) int64 -> final-normed hidden states (B, T, D).

        prefix: optional (B, P, D) embeddings run before the text (a caption prefix); they get
        no text position and are dropped from the output.
        kv_cache: `text` continues the `kv_cache.length` tokens already run (causal towers
        only); its positions start there, and the cache gets its keys and values.
        token_mask: (B, kv_cache.length + T) bool, True = real token, over the cached
            positions and these; padding may be anywhere (`generate` pads on the left).
            Each row's positions count its real tokens only (cumsum - 1), and padded keys
            are never attended, so a real token's hidden state is that of its row run alone
            without the padding.  Padded positions' outputs are finite but meaningless.
            Not with `text_mask` or `prefix`.
        rows: (B,) int64, the one position of each row the caller reads (`pool` reads the
            end of the text): the last block computes only those and the result is (B, 1, D)
            (`Transformer` rows).  Not with `kv_cache`.
        """
        # a single unbatched row or tokenizer output left as floats would otherwise fail deep
        # in the embedding; out-of-vocabulary ids are checked (below) on the CPU only (on a
        # GPU the check would sync it, and its embedding asserts them)
        if text.ndim != 2:
            raise ValueError(f"text must be (B, T) token ids, got shape {tuple(text.shape)}")
        if text.dtype not in (torch.int64, torch.int32):  # what the embedding takes
            raise TypeError(
                f"text must be integer token ids (int64), got {text.dtype}"
                + ("; convert with .long()" if not text.is_floating_point() else "")
            )
        b, t = text.shape
        text_mask = as_text_mask(text, text_mask)
        if token_mask is not None:
            if text_mask is not None or prefix is not None:
                raise ValueError("token_mask is not for use with text_mask or a prefix")
            if token_mask.dtype != torch.bool:
                raise ValueError(
                    f"token_mask must be bool (True = real token), got {token_mask.dtype}"
                )
        if text_mask is not None and text_mask.device.type == "cpu" and t > 1:
            raise_left_padded(text_mask_faults(text_mask)[1])  # on a GPU: `encode` checks
        start = 0
        if kv_cache is not None:
            if not self.cfg.causal or prefix is not None or text_mask is not None:
                raise ValueError(
                    "a kv cache needs a causal text tower, no prefix, no text_mask "
                    "(token_mask is fine)"
                )
            start = kv_cache.length
        if start + t > self.cfg.context_length:
            raise ValueError(
                f"text length {start + t} exceeds context_length {self.cfg.context_length}"
            )
        positions = None  # per row (B, T), with a token_mask
        if token_mask is not None:
            if token_mask.shape != (b, start + t):
                raise ValueError(
                    f"token_mask must be (B, cached + T) = {(b, start + t)}, "
                    f"got {tuple(token_mask.shape)}"
                )
            positions = (token_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, start:]
            text = text.masked_fill(~token_mask[:, start:], 0)  # any pad id: never looked up
        if text.device.type == "cpu" and text.numel():
            lo, hi = (int(v) for v in torch.aminmax(text))  # one pass over the ids
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(
                    f"token id {lo if lo < 0 else hi} is outside the text tower's vocabulary "
                    f"[0, {self.cfg.vocab_size}): the ids come from another tokenizer (an "
                    "export's own is get_tokenizer(EXPORT_DIR))"
                )
        x = self.token_embed(text)  # (B, T, D)
        if self.pos_embed is not None:
            if positions is not None:
                x = x + self.pos_embed[positions].to(x.dtype)
            else:
                x = x + self.pos_embed[start : start + t].to(x.dtype)
        num_prefix = 0
        if prefix is not None:
            num_prefix = prefix.shape[1]
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        attn_mask = None
        if text_mask is not None and not self.cfg.causal:
            keys = F.pad(text_mask, (num_prefix, 0), value=True)
            attn_mask = keys[:, None, None, :]  # (B, 1, 1, P + T)
        if token_mask is not None:
            # real keys only; a padded query also sees itself, so that no row of the
            # attention is empty and its (never attended) value stays finite.  The causal
            # triangle is added by the attention (bottom-right under a kv cache).
            own = torch.arange(start + t, device=text.device) == torch.arange(
                start, start + t, device=text.device
            ).unsqueeze(1)  # (T, cached + T): query i is key start + i
            attn_mask = (token_mask[:, None, :] | own)[:, None]  # (B, 1, T, cached + T)
        rope = None
        if self.rope is not None:
            if positions is not None:
                rope = self.rope(positions)  # (B, T, d) per row
            else:
                rope = self.rope(torch.arange(start, start + t, device=text.device))
        x = self.trunk(
            x,
            is_causal=self.cfg.causal,
            attn_mask=attn_mask,
            rope=rope,
            kv_cache=kv_cache,
            rows=None if rows is None else rows + num_prefix,
        )
        return self.norm(x if rows is not None else x[:, num_prefix:])

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
        *,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits (B, T, V): position t predicts token t + 1.  token_mask: see
        `forward_tokens` (each row's real tokens as if run alone, e.g. a left-padded batch)."""
        return self.head(self.forward_tokens(text, text_mask, prefix, token_mask=token_mask))

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
        _check_not_empty(text)
        text_mask = as_text_mask(text, text_mask)
        tokens = self.forward_tokens(text, text_mask)
        return {"pooled": self.pool(tokens, text_mask), "tokens": tokens}

    def forward_pooled(
        self, text: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`forward_features(text, text_mask)["pooled"]` (B, D) for less work: pooled at the end
        of the text, the last block computes that position only (`forward_tokens` rows)."""
        _check_not_empty(text)
        text_mask = as_text_mask(text, text_mask)
        if self.cfg.pool == "mean" or text.ndim != 2:  # (forward_tokens names a wrong shape)
            return self.pool(self.forward_tokens(text, text_mask), text_mask)
        valid = text_mask if text_mask is not None else torch.ones_like(text, dtype=torch.bool)
        return self.forward_tokens(text, text_mask, rows=last_valid_index(valid))[:, 0]

    def encode(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """text (B, T) -> (B, E): pooled features through the projection, if any.  Runs
        without the all-padding trailing columns (`trim_padding`)."""
        text_mask = as_text_mask(text, text_mask)
        if text_mask is not None and text.ndim == 2:
            empty, left_padded = text_mask_faults(text_mask).cpu()  # one sync for both
            if bool(empty.any()):  # it pooled a padding position
                row = int(empty.nonzero()[0])
                raise ValueError(f"text_mask row {row} marks no token valid: nothing to encode")
            raise_left_padded(left_padded)
        text, text_mask = trim_padding(text, text_mask, limit=self.cfg.context_length)
        pooled = self.forward_pooled(text, text_mask)
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
        prompt_mask: torch.Tensor | None = None,
        *,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        vocab_limit: int | None = None,
        top_p: float | None = None,
    ) -> torch.Tensor:
        """Sample a continuation of a prompt.  text: (B, T0) -> (B, T0 + max_new_tokens).

        temperature 0 is greedy decoding; top_k and top_p (nucleus sampling) filter the
        tokens sampled from, in that order, as Hugging Face's generate.  Rows that emitted
        `eos_id` keep emitting it, and once every row has, the rest is filled with it without
        running the model.  Runs in eval mode (no dropout) and restores each module's mode afterwards.
        A causal tower keeps a kv cache, so each new token runs one position.  The prompt
        window slides when it grows past context_length; sliding moves every position, so
        from then on each token reruns the whole window, as does a bidirectional tower.

        prompt_mask: optional (B, T0) bool, True = real token, for prompts of different
        lengths padded on the LEFT (each row's padding before its tokens, as a Hugging Face
        tokenizer with padding_side="left" gives; the pad ids themselves are never read).
        Each row then runs as if alone: its positions count its real tokens only, padded
        keys are never attended, and the new tokens are real.  The output keeps the padding
        in place: row b's new tokens are out[b, T0:] in any case.  With it, the cached, the
        sliding-window (the window's positions are recounted from its real tokens, as a row
        run alone slides once its own tokens pass context_length) and the bidirectional
        paths all hold.  A mask that is not (B, T0) bool, not left-padded, or has a row with
        no real token is refused (ValueError).  Greedy, each row equals generating it alone
        from its unpadded prompt (up to float rounding, as a kv cache against a rerun).

        num_beams > 1: deterministic beam search (`mmssl.models.beam`: the num_beams best
        sequences by summed log-probability; finished ones scored sum / len**length_penalty,
        len the generated tokens with eos; the best hypothesis per row, eos-filled after its
        eos).  Sampling options (temperature, top_k, top_p, generator) are refused with it, and
        length_penalty without it.  The kv cache is expanded to B * num_beams rows after the
        prompt and reordered by each step's parent beams; prompt_mask, the sliding window
        and a bidirectional tower work as above (each beam carries its row's mask).

        vocab_limit: only ids below it are generated (a tokenizer with fewer ids than the
        model's vocab_size, padded as nanoGPT pads GPT-2's 50257 to 50304, has no text for
        the others): the logits are cut to the first vocab_limit ids before sampling.
        """
        check_sampling(temperature, top_k, top_p)
        check_token_id(eos_id, self.cfg.vocab_size)
        vocab_limit = check_vocab_limit(vocab_limit, self.cfg.vocab_size, eos_id)
        check_beam(num_beams, temperature, top_k, generator, length_penalty, top_p)
        check_max_new_tokens(max_new_tokens)
        if text.ndim != 2 or text.shape[1] == 0:
            raise ValueError(
                f"text must be a (B, T0) prompt with T0 >= 1 tokens, got shape {tuple(text.shape)}"
            )
        if prompt_mask is not None:
            check_prompt_mask(prompt_mask, text)
        with eval_mode(self):
            return self._generate(
                text,
                max_new_tokens,
                temperature,
                top_k,
                eos_id,
                generator,
                prompt_mask,
                num_beams,
                length_penalty,
                vocab_limit,
                top_p,
            )

    def _generate(
        self,
        text: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        eos_id: int | None,
        generator: torch.Generator | None,
        prompt_mask: torch.Tensor | None,
        num_beams: int,
        length_penalty: float,
        vocab_limit: int | None,
        top_p: float | None,
    ) -> torch.Tensor:
        ctx = self.cfg.context_length
        cache = KVCache(len(self.trunk.blocks), ctx) if self.cfg.causal else None
        prompt_len = text.shape[1]

        def mask_of(text: torch.Tensor) -> torch.Tensor | None:
            if prompt_mask is None:
                return None  # the new tokens are real: the mask grows with True
            return F.pad(prompt_mask, (0, text.shape[1] - prompt_len), value=True)

        def next_logits(text: torch.Tensor) -> torch.Tensor:
            mask = mask_of(text)
            if cache is not None and text.shape[1] <= ctx:
                hidden = self.forward_tokens(
                    text[:, cache.length :], kv_cache=cache, token_mask=mask
                )
            else:
                # the window's positions are recounted from its own real tokens: each row's
                # real tokens in it are its last ones, as in the row's own window
                window_mask = mask[:, -ctx:] if mask is not None else None
                hidden = self.forward_tokens(text[:, -ctx:], token_mask=window_mask)
            logits = self.head(hidden[:, -1])
            return logits if vocab_limit is None else logits[:, :vocab_limit]

        if num_beams > 1:

            def reorder(index: torch.Tensor) -> None:
                nonlocal prompt_mask
                if cache is not None:
                    cache.reorder(index)
                if prompt_mask is not None:
                    prompt_mask = prompt_mask.index_select(0, index)

            return beam_search(
                next_logits, reorder, text, max_new_tokens, num_beams, eos_id, length_penalty
            )
        return sample_tokens(
            next_logits, text, max_new_tokens, temperature, top_k, eos_id, generator, top_p
        )

    def flops_per_token(self) -> float:
        """Forward FLOPs per token at full context (2 per multiply-add), LM head included."""
        c = self.cfg
        per_block = 2 * c.dim * c.dim * (4 + 2 * c.block.mlp_ratio) + 4 * c.context_length * c.dim
        head = 2 * c.dim * c.vocab_size if c.lm_head else 0
        return c.depth * per_block + head
