"""MultimodalModel: the towers (or one shared trunk), the logit scale, encode_image/encode_text.

Every named architecture builds this class; a vision-only ViT or a text-only GPT is the same
class with one tower.  Models compute representations only: losses live in
`mmssl.objectives`, and tasks in `mmssl.train` put the two together.
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.models.beam import check_beam
from mmssl.models.caption import CaptionDecoder
from mmssl.models.carried import CarriesBuffer
from mmssl.models.condition import DescriptorEncoder, Projector, TextConditioner, check_cond
from mmssl.models.config import ModelConfig
from mmssl.models.gen_args import (
    check_max_new_tokens,
    check_sampling,
    check_token_id,
    check_vocab_limit,
)
from mmssl.models.text import TextTransformer, eval_mode
from mmssl.models.vision import VisionEncoder
from mmssl.nn import Attention, ConditionedGate, ConditionedNorm, Mlp, Norm, SwiGLU
from mmssl.nn.layers import check_dtype


class MultimodalModel(CarriesBuffer):
    CARRIED = "cond_prompt"  # the ids of the prompt cond=None stands for, when set
    # the parts a config may leave out are None
    visual: VisionEncoder | None
    text: TextTransformer | None
    logit_scale: nn.Parameter | None
    caption: CaptionDecoder | None
    conditioner: DescriptorEncoder | TextConditioner | None
    projector: Projector | None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        cond_dim = cfg.condition.dim if cfg.condition is not None else None
        self.visual = (
            VisionEncoder(cfg.vision, cfg.embed_dim, cond_dim=cond_dim) if cfg.vision else None
        )
        trunk = self.visual.trunk if cfg.shared_trunk and self.visual is not None else None
        # With shared_trunk the very same Transformer module is registered under both towers;
        # parameters() and the optimizer see it once.
        self.text = TextTransformer(cfg.text, cfg.embed_dim, trunk=trunk) if cfg.text else None
        self.logit_scale = (
            nn.Parameter(torch.tensor(cfg.logit_scale_init))
            if self.visual is not None and self.text is not None
            else None
        )
        # ModelConfig refuses each of the missing towers below; the checks narrow the types
        self.caption = None
        if cfg.caption is not None:
            if cfg.vision is None or cfg.text is None:
                raise ValueError("a caption decoder needs both a vision and a text tower")
            self.caption = CaptionDecoder(cfg.caption, cfg.text, cfg.vision.dim)
        self.conditioner = None
        if cfg.condition is not None and cfg.condition.source == "descriptor":
            c = cfg.condition
            self.conditioner = DescriptorEncoder(c.dim, c.hidden_dim, c.layout)
        elif cfg.condition is not None:
            if cfg.text is None:
                raise ValueError("condition.source 'text' needs a text tower")
            self.conditioner = TextConditioner(cfg.text.dim, cfg.condition.dim)
        # (1, T) int64 ids of the prompt training conditioned every image on, when it had one
        # (an export's config.json "condition"; `image_condition`); set by `load_pretrained`,
        # and in the state dict while set (`mmssl.models.carried`)
        self.cond_prompt: torch.Tensor | None
        self.register_buffer("cond_prompt", None, persistent=False)
        p = cfg.projector
        self.projector = None
        if p is not None:
            if cfg.vision is None:
                raise ValueError(
                    "a projector needs a vision tower (it maps the pooled image features)"
                )
            self.projector = Projector(
                cfg.vision.dim, p.hidden_dim, p.out_dim, p.depth, p.cond, cond_dim, p.hyper_rank
            )
        self.init_weights()

    def carried_problem(self, saved: torch.Tensor) -> str | None:
        """A saved cond_prompt's fit (`CarriesBuffer`): "" for a model not conditioned on
        text."""
        if not isinstance(self.conditioner, TextConditioner) or self.cfg.text is None:
            return ""
        vocab = self.cfg.text.vocab_size
        ints = not (saved.is_floating_point() or saved.is_complex() or saved.dtype == torch.bool)
        fits = ints and saved.dim() == 2 and saved.shape[0] == 1 and saved.shape[1] >= 1
        if not (fits and 0 <= int(saved.min()) and int(saved.max()) < vocab):
            return f"{saved.dtype} {tuple(saved.shape)}, not (1, T) token ids in [0, {vocab})"
        return None

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter.  With std = cfg.init_std (0.02 by default):

        - Linear and patch-embedding conv weights: truncated normal(std); biases 0.
        - Residual output projections (attention `proj`, MLP `fc2`): std / sqrt(2 * depth),
          so the residual stream's variance does not grow with depth (GPT-2).
        - Token embeddings and learned position tables: normal(std); class token: normal(1e-6).
        - Norm weights 1, biases 0.
        - adaLN-Zero modulation and gates, and the projector's conditioning weights: 0, so a
          conditioned model starts equal to the unconditioned one.
        - logit_scale: cfg.logit_scale_init (log(1/0.07)).
        """
        std = self.cfg.init_std
        depth = max(
            (tower.cfg.depth for tower in (self.visual, self.text) if tower is not None), default=1
        )
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, (Norm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        residual_std = std / math.sqrt(2 * depth)
        for module in self.modules():
            if isinstance(module, Attention):
                nn.init.trunc_normal_(module.proj.weight, std=residual_std)
            elif isinstance(module, (Mlp, SwiGLU)):
                nn.init.trunc_normal_(module.fc2.weight, std=residual_std)
        for module in self.modules():
            if isinstance(module, (ConditionedNorm, ConditionedGate, Projector)):
                module.reset_conditioning()
        for tower in (self.visual, self.text):
            if tower is not None and tower.pos_embed is not None:
                nn.init.normal_(tower.pos_embed, std=std)
        if self.visual is not None and self.visual.cls_token is not None:
            nn.init.normal_(self.visual.cls_token, std=1e-6)
        if self.logit_scale is not None:
            self.logit_scale.fill_(self.cfg.logit_scale_init)

    @overload
    def _tower(self, name: Literal["vision"]) -> VisionEncoder: ...
    @overload
    def _tower(self, name: Literal["text"]) -> TextTransformer: ...
    @overload
    def _tower(self, name: str) -> VisionEncoder | TextTransformer: ...
    def _tower(self, name: str) -> VisionEncoder | TextTransformer:
        tower: VisionEncoder | TextTransformer | None = (
            self.visual if name == "vision" else self.text
        )
        if tower is None:
            raise RuntimeError(f"this model has no {name} tower")
        return tower

    def condition(
        self,
        aug: torch.Tensor | None = None,
        cond_text: torch.Tensor | None = None,
        cond_text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The condition vector c (B, C): from descriptors aug (B, 13), or from the pooled text
        features of cond_text (B, T).  None when the model is unconditioned or no input is given.

        Only the input of the model's `condition.source` is read: passing only the other one
        is a ValueError, not a silent None (which would give the plain features)."""
        if self.conditioner is None:
            return None
        if isinstance(self.conditioner, DescriptorEncoder):
            if aug is None and cond_text is not None:
                raise ValueError(
                    "this model is conditioned on augmentation descriptors (condition.source "
                    "'descriptor'), not on text: pass aug (B, 13), not cond_text"
                )
            return None if aug is None else self.conditioner(aug)
        if cond_text is None:
            if aug is not None:
                raise ValueError(
                    "this model is conditioned on text (condition.source 'text'), not on "
                    "augmentation descriptors: pass cond_text (B, T), not aug"
                )
            return None
        text_tower = self._tower("text")
        pooled = text_tower.forward_pooled(cond_text, cond_text_mask)
        return self.conditioner(pooled)

    def neutral_condition(
        self, batch_size: int, device: torch.device | None = None
    ) -> torch.Tensor | None:
        """c of the un-augmented view (the neutral descriptor): the condition to use for
        downstream features of a backbone-conditioned model."""
        if not isinstance(self.conditioner, DescriptorEncoder):
            return None
        aug = self.conditioner.layout.neutral_tensor(batch_size)
        return self.conditioner(aug.to(device) if device is not None else aug)

    def project(self, pooled: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The SSL projector: pooled (B, D) -> z (B, out_dim), conditioned on c if given."""
        if self.projector is None:
            raise RuntimeError("this model has no projector (set `projector` in its config)")
        check_dtype(pooled, next(self.projector.parameters()), "pooled features")
        cond = self._no_stray(cond)
        if self.projector.mode == "none":  # c is for the backbone: checked, not passed on
            if cond is not None and self.cfg.condition is not None:
                check_cond(
                    cond, self.cfg.condition.dim, pooled.shape[0], "projector cond", "features"
                )
            cond = None
        return self.projector(pooled, cond)

    def forward_features(
        self, images: torch.Tensor, cond: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """images (B, C, H, W) -> {pooled (B, D), tokens (B, N, D)} of the vision tower.
        cond=None: the features of the un-augmented image (`image_condition`)."""
        return self._tower("vision").forward_features(images, self.image_condition(cond))

    def forward_pooled(
        self, images: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`forward_features(images, cond)["pooled"]` (B, D), for less work where the tower
        pools at its class token (`VisionEncoder.forward_pooled`)."""
        return self._tower("vision").forward_pooled(images, self.image_condition(cond))

    def image_condition(
        self, cond: torch.Tensor | None, device: torch.device | None = None
    ) -> torch.Tensor | None:
        """`cond`, or for None the condition of an un-augmented image: the neutral
        descriptor's c when the vision backbone is conditioned on augmentation descriptors,
        as training conditions a plain image (`mmssl.train.tasks`), and the c of the prompt
        training conditioned every image on (`cond_prompt`) when it is conditioned on text.
        Such a tower never ran without a condition, and once trained its features without
        one are another network's.  None for other models (and a text-conditioned one
        trained with several prompts: the plain path)."""
        visual = self._tower("vision")
        conditioned = visual.cfg.cond_dim or visual.cfg.cond_tokens
        if cond is None and conditioned and self.cond_prompt is not None:
            return self.condition(cond_text=self.cond_prompt)
        if cond is None and conditioned:
            return self.neutral_condition(1, device or next(visual.parameters()).device)
        cond = self._no_stray(cond)
        # a tower the conditioner does not reach (it conditions the projector) gets None
        return cond if conditioned else None

    def _no_stray(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        """`cond`, unless this model has no conditioner to have made it: then nothing reads
        it, and the caller would get the plain features without a word."""
        if cond is not None and self.conditioner is None:
            raise ValueError(
                "this model is not conditioned (no `condition` in its config), so nothing "
                "reads cond: pass cond=None"
            )
        return cond

    @torch.no_grad()
    def standalone_vision(self, copy: bool = True) -> VisionEncoder:
        """A copy of the vision tower that stands alone (`load_encoder`, a fine-tuned copy):
        its cond=None gives what this model's gives now (its `VisionEncoder.cond_default`
        is `image_condition(None)`, from the conditioner's weights now).  copy=False sets it
        on this model's own tower instead, for a model about to be dropped (`load_encoder`):
        the tower's cond=None then no longer follows the conditioner."""
        import copy as copying

        visual = self._tower("vision")
        visual = copying.deepcopy(visual) if copy else visual
        visual.cond_default = self.image_condition(None)
        return visual

    def encode_image(
        self, images: torch.Tensor, cond: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        """images (B, C, H, W) -> (B, E) embeddings, L2-normalised if `normalize`."""
        out = self._tower("vision").encode(images, self.image_condition(cond))
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(
        self, text: torch.Tensor, text_mask: torch.Tensor | None = None, normalize: bool = False
    ) -> torch.Tensor:
        """text (B, T) int64, text_mask (B, T) bool -> (B, E) embeddings."""
        out = self._tower("text").encode(text, text_mask)
        return F.normalize(out, dim=-1) if normalize else out

    def lm_logits(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """text (B, T) -> next-token logits (B, T, V)."""
        return self._tower("text").logits(text, text_mask)

    def caption_logits(
        self, image_tokens: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """image_tokens (B, N, Dv) from forward_features, text (B, T) -> logits (B, T, V)."""
        if self.caption is None:
            raise RuntimeError("this model has no caption decoder (set `caption` in its config)")
        if image_tokens.ndim != 3:  # images themselves failed deep in attention
            raise ValueError(
                f"image_tokens must be (B, N, D), got shape {tuple(image_tokens.shape)}: pass "
                "forward_features(images)['tokens'] (generate_captions takes images)"
            )
        check_dtype(image_tokens, next(self.caption.parameters()), "image_tokens")
        return self.caption(self.text, image_tokens, text, text_mask)

    @torch.no_grad()
    def generate_captions(
        self,
        images: torch.Tensor,
        max_new_tokens: int,
        *,
        prompt: torch.Tensor | None = None,
        bos_id: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        cond: torch.Tensor | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        vocab_limit: int | None = None,
        top_p: float | None = None,
    ) -> torch.Tensor:
        """Caption images (B, C, H, W) -> token ids (B, T0 + max_new_tokens), prompt included.

        The caption starts from `prompt` (B, T0), or from the bos token alone (pass the
        tokenizer's `bos_id`), as training frames captions with bos ... eos.  The sampling
        options are `TextTransformer.generate`'s: temperature 0 is greedy, top_k, top_p, rows that
        emitted `eos_id` are filled with it.  The images are encoded once (with `cond`, or the
        neutral condition of a descriptor-conditioned model).  Runs in eval mode and restores
        each module's mode afterwards.  The caption must fit in the text context_length: a
        sliding window, as `TextTransformer.generate` has, would drop the bos.
        num_beams > 1: deterministic beam search, as open_clip's CoCa captions (see
        `TextTransformer.generate`: length_penalty, the refused sampling options).
        vocab_limit: only ids below it are generated (a tokenizer smaller than the padded
        vocab_size), as in `TextTransformer.generate`.
        """
        if self.caption is None:
            raise RuntimeError("this model has no caption decoder (set `caption` in its config)")
        text = self._tower("text")
        check_sampling(temperature, top_k, top_p)
        check_beam(num_beams, temperature, top_k, generator, length_penalty, top_p)
        check_max_new_tokens(max_new_tokens)
        check_token_id(eos_id, text.cfg.vocab_size)
        check_token_id(bos_id, text.cfg.vocab_size, "bos_id")
        vocab_limit = check_vocab_limit(vocab_limit, text.cfg.vocab_size, eos_id)
        b = images.shape[0]
        if (prompt is None) == (bos_id is None):
            raise ValueError("pass either prompt (B, T0) or the tokenizer's bos_id, not both")
        if prompt is None:
            prompt = torch.full((b, 1), bos_id, dtype=torch.int64, device=images.device)  # type: ignore[arg-type]
        if prompt.ndim != 2 or prompt.shape[0] != b or prompt.shape[1] == 0:
            raise ValueError(
                f"prompt must be (B, T0) token ids with B = {b} images and T0 >= 1, "
                f"got shape {tuple(prompt.shape)}"
            )
        ctx = text.cfg.context_length
        if prompt.shape[1] + max_new_tokens > ctx:
            raise ValueError(
                f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} exceeds the "
                f"text context_length {ctx}; sliding past it would drop the bos"
            )
        with eval_mode(self):
            image_tokens = self.forward_features(images, cond)["tokens"]  # (B, N, Dv)
            return self.caption.generate(
                text,
                image_tokens,
                prompt,
                max_new_tokens,
                temperature,
                top_k,
                eos_id,
                generator,
                num_beams,
                length_penalty,
                vocab_limit,
                top_p,
            )

    def forward(
        self, images: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP-style: normalised image and text embeddings, each (B, E)."""
        return self.encode_image(images, normalize=True), self.encode_text(text, text_mask, True)

    def num_params(self, tower: str | None = None) -> int:
        """Unique parameter count of the model, or of one tower ('vision' / 'text')."""
        module = self if tower is None else self._tower(tower)
        return sum(p.numel() for p in module.parameters())
