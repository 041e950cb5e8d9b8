"""Caption decoders (CoCa style): next-token logits of a caption given image tokens."""

from __future__ import annotations

import torch
from torch import nn

from mmssl.models.beam import beam_search
from mmssl.models.config import CaptionConfig, TextConfig
from mmssl.models.text import TextTransformer, sample_tokens
from mmssl.models.trunk import build_trunk
from mmssl.nn import KVCache, Norm, Transformer


class CaptionDecoder(nn.Module):
    """Text hidden states attend to image tokens, then the text tower's LM head.

    mode "cross": `depth` extra Blocks with cross-attention over the image tokens, on top of
    the (unimodal) text tower, as CoCa's multimodal decoder.  They continue the text tower:
    a rotary tower's positions rotate their self-attention too, and they checkpoint
    activations when the text tower does (`train.activation_checkpointing`).
    mode "prefix": image tokens are projected to the text width and prepended to the caption,
    which runs causally through the text tower itself.
    """

    # cross mode: the decoder Blocks and their final norm; prefix mode: the image projection
    decoder: Transformer | None
    norm: Norm | None
    prefix_proj: nn.Linear | None

    def __init__(self, cfg: CaptionConfig, text_cfg: TextConfig, image_dim: int):
        super().__init__()
        self.mode = cfg.mode
        if cfg.mode == "cross":
            self.decoder = build_trunk(
                text_cfg.dim,
                cfg.depth,
                text_cfg.num_heads,
                text_cfg.block,
                causal=True,
                cross_attn=True,
                context_dim=image_dim,
                grad_checkpointing=text_cfg.grad_checkpointing,
            )
            self.norm = Norm(text_cfg.dim, text_cfg.block.norm, text_cfg.block.norm_eps)
            self.prefix_proj = None
        else:
            self.decoder = None
            self.norm = None
            self.prefix_proj = nn.Linear(image_dim, text_cfg.dim)

    def hidden(
        self,
        text_tower: TextTransformer,
        image_tokens: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        text_hidden: torch.Tensor | None = None,
        kv_cache: tuple[KVCache, KVCache] | None = None,
    ) -> torch.Tensor:
        """image_tokens (B, N, Dv), text (B, T) -> final-normed hidden states (B, T, D) that
        the LM head scores.  text_hidden: the text tower's hidden states of `text`, if
        already computed (cross mode reuses them, as CoCa's split of the text tower).
        kv_cache: (the text tower's, the decoder's), cross mode only: `text` continues the
        positions already cached (incremental decoding), see `new_kv_cache`; the decoder's
        cache also holds the keys and values of these image_tokens, so it serves one caption
        of the same image_tokens only."""
        if self.prefix_proj is not None:
            if kv_cache is not None:
                raise ValueError("a kv cache is for the cross mode (a prefix is rerun)")
            prefix = self.prefix_proj(image_tokens)
            return text_tower.forward_tokens(text, text_mask, prefix=prefix)
        text_cache, decoder_cache = kv_cache if kv_cache is not None else (None, None)
        start = text_cache.length if text_cache is not None else 0
        if text_hidden is None:
            text_hidden = text_tower.forward_tokens(text, text_mask, kv_cache=text_cache)
        rope = None
        if text_tower.rope is not None:
            # a learned table is added once, at the embedding; rotary positions act inside
            # every attention, so without them these blocks would not know token order
            positions = torch.arange(start, start + text_hidden.shape[1], device=text_hidden.device)
            rope = text_tower.rope(positions)
        if self.decoder is None or self.norm is None:  # without a prefix_proj: cross mode
            raise RuntimeError(f"a cross-mode caption decoder without its blocks ({self.mode!r})")
        hidden = self.decoder(
            text_hidden, is_causal=True, context=image_tokens, rope=rope, kv_cache=decoder_cache
        )
        return self.norm(hidden)

    def new_kv_cache(self, text_tower: TextTransformer) -> tuple[KVCache, KVCache] | None:
        """Empty caches for `hidden` over a whole caption (cross mode; None for prefix mode,
        whose image prefix comes first and would shift every cached position)."""
        if self.decoder is None:
            return None
        ctx = text_tower.cfg.context_length
        return KVCache(len(text_tower.trunk.blocks), ctx), KVCache(len(self.decoder.blocks), ctx)

    def generate(
        self,
        text_tower: TextTransformer,
        image_tokens: torch.Tensor,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        eos_id: int | None,
        generator: torch.Generator | None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        vocab_limit: int | None = None,
        top_p: float | None = None,
    ) -> torch.Tensor:
        """image_tokens (B, N, Dv), prompt (B, T0) -> (B, T0 + max_new_tokens) token ids.

        The caller checks the options and sets eval mode (`MultimodalModel.generate_captions`).
        Cross mode runs each new token once through a kv cache, whose decoder layers also
        keep the image tokens' cross-attention keys and values (projected at the first
        step, valid for these image tokens only); prefix mode reruns the caption.
        num_beams > 1: beam search (`mmssl.models.beam`); the text caches are expanded to
        B * num_beams rows after the prompt and reordered by each step's parents, and the
        image tokens and their cached keys and values are expanded once (a beam never moves
        to another image).  vocab_limit: only ids below it are generated (checked by the
        caller), as in `TextTransformer.generate`.
        """
        cache = self.new_kv_cache(text_tower)

        def next_logits(text: torch.Tensor) -> torch.Tensor:
            if cache is not None:
                text = text[:, cache[0].length :]
            logits = text_tower.head(
                self.hidden(text_tower, image_tokens, text, kv_cache=cache)[:, -1]
            )
            return logits if vocab_limit is None else logits[:, :vocab_limit]

        if num_beams > 1:

            def reorder(index: torch.Tensor) -> None:
                nonlocal image_tokens
                if cache is not None:
                    cache[0].reorder(index)
                    cache[1].reorder(index)
                if index.shape[0] != image_tokens.shape[0]:
                    # B images -> B * num_beams rows, once: later indices pick parents among
                    # one image's beams, whose image tokens are the same
                    image_tokens = image_tokens.index_select(0, index)

            return beam_search(
                next_logits, reorder, prompt, max_new_tokens, num_beams, eos_id, length_penalty
            )
        return sample_tokens(
            next_logits, prompt, max_new_tokens, temperature, top_k, eos_id, generator, top_p
        )

    def forward(
        self,
        text_tower: TextTransformer,
        image_tokens: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """image_tokens (B, N, Dv), text (B, T) -> logits (B, T, V); position t predicts t + 1."""
        return text_tower.head(self.hidden(text_tower, image_tokens, text, text_mask))
