"""VisionEncoder (ViT): patches -> Transformer -> pooled and tokens -> projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmssl.models.carried import CarriesBuffer
from mmssl.models.condition import PrefixTokens, check_cond
from mmssl.models.config import VisionConfig
from mmssl.models.trunk import build_trunk
from mmssl.nn import Norm, PatchEmbed, RotaryEmbedding, Transformer, sincos_2d


def local_window_mask(
    grid_h: int, grid_w: int, window: int, num_prefix: int, device: torch.device
) -> torch.Tensor:
    """Bool attention mask (P + N, P + N), True = may attend, for `VisionConfig.attn_window`.

    Patch rows see the patches within Chebyshev distance `window` on the (grid_h, grid_w)
    grid and no prefix token (an unrotated prefix key would give a rope query an absolute
    position); prefix rows see everything.  The patch block depends only on grid offsets, so
    it is translation-invariant.
    """
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, device=device), torch.arange(grid_w, device=device), indexing="ij"
    )
    ys, xs = ys.flatten(), xs.flatten()
    near = ((ys[:, None] - ys[None]).abs() <= window) & ((xs[:, None] - xs[None]).abs() <= window)
    n = num_prefix + grid_h * grid_w
    mask = torch.ones(n, n, dtype=torch.bool, device=device)
    mask[num_prefix:, :num_prefix] = False
    mask[num_prefix:, num_prefix:] = near
    return mask


def resample_pos_embed(
    table: torch.Tensor, num_prefix: int, grid_h: int, grid_w: int
) -> torch.Tensor:
    """A learned position table (1, P + G * G, D) of a square G x G patch grid, resampled to
    (1, P + grid_h * grid_w, D); its P prefix rows are kept as they are.

    Antialiased bicubic, as timm and open_clip resample theirs (a different kernel even when
    upsampling): converted weights then match their peer at any resolution.  In fp32 as they
    do (the CPU kernel has no bf16 version), then back to the table's dtype.
    """
    prefix, grid = table[:, :num_prefix], table[:, num_prefix:]
    side = round(grid.shape[1] ** 0.5)
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False, antialias=True
    ).to(grid.dtype)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


class VisionEncoder(CarriesBuffer):
    """A ViT.  images (B, C, H, W) -> `forward_features` {pooled (B, D), tokens (B, N, D)}.

    `tokens` are the N patch tokens after the final norm (no class token), in row-major grid
    order.  `cond` (B, C) reaches the adaLN-Zero blocks when `cfg.cond_dim` is set, and
    becomes `cfg.cond_tokens` prefix tokens when that is set (`cond_dim` gives C then);
    a (1, C) cond conditions every image alike.  cond=None takes `cond_default`: None (the
    plain features) unless set, as `MultimodalModel.standalone_vision` sets it to the
    neutral descriptor's c for a tower that stands alone.
    """

    CARRIED = "cond_default"  # the condition of cond=None, when set

    def __init__(
        self,
        cfg: VisionConfig,
        embed_dim: int | None = None,
        trunk: Transformer | None = None,
        cond_dim: int | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, d, bias=cfg.patch_bias)
        self.num_prefix = 1 if cfg.class_token else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, self.num_prefix + self.grid**2, d))
            if cfg.pos_embed == "learned"
            else None
        )
        self.cond_prefix = (
            PrefixTokens(cond_dim or cfg.cond_dim or 0, cfg.cond_tokens, d)
            if cfg.cond_tokens
            else None
        )
        self.rope = RotaryEmbedding(d // cfg.num_heads, axes=2) if cfg.pos_embed == "rope" else None
        self.norm_pre = (
            Norm(d, cfg.block.norm, cfg.block.norm_eps) if cfg.pre_norm else nn.Identity()
        )
        self.trunk = trunk or build_trunk(
            d,
            cfg.depth,
            cfg.num_heads,
            cfg.block,
            causal=False,
            cond_dim=cfg.cond_dim,
            cond_depth=cfg.cond_depth,
            grad_checkpointing=cfg.grad_checkpointing,
        )
        self.norm = Norm(d, cfg.block.norm, cfg.block.norm_eps)
        self.proj = nn.Linear(d, embed_dim, bias=False) if embed_dim else None
        # in the state dict while set, so a standalone tower's round trip keeps its cond=None,
        # even into a fresh tower, which has none (`mmssl.models.carried`)
        self.cond_default: torch.Tensor | None
        self.register_buffer("cond_default", None, persistent=False)
        self._masks: dict[tuple[int, int, int, torch.device], torch.Tensor] = {}

    def carried_problem(self, saved: torch.Tensor) -> str | None:
        """A saved cond_default's fit (`CarriesBuffer`): "" for a tower that reads no cond."""
        width = self.cond_prefix.proj.in_features if self.cond_prefix is not None else None
        width = width or self.cfg.cond_dim
        if not width:
            return ""
        if not saved.is_floating_point() or tuple(saved.shape) != (1, width):
            return f"{saved.dtype} {tuple(saved.shape)}, this tower reads a float (1, {width})"
        return None

    def _abs_pos(self, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor | None:
        """The absolute position table for a grid, (1, P + N, D), resampled if the grid differs."""
        if self.cfg.pos_embed == "sincos":
            pos = sincos_2d(self.cfg.dim, grid_h, grid_w).to(device)
            return F.pad(pos, (0, 0, self.num_prefix, 0))[None]
        if self.pos_embed is None:
            return None
        if (grid_h, grid_w) == (self.grid, self.grid):
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, self.num_prefix, grid_h, grid_w)

    def _rope(
        self, grid_h: int, grid_w: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.rope is None:
            return None
        ys, xs = torch.meshgrid(
            torch.arange(grid_h, device=device), torch.arange(grid_w, device=device), indexing="ij"
        )
        return self.rope(torch.stack([ys.flatten(), xs.flatten()], dim=1))

    def _attn_mask(
        self, grid_h: int, grid_w: int, num_prefix: int, device: torch.device
    ) -> torch.Tensor | None:
        """The local-window mask (P + N, P + N) of `cfg.attn_window`, built once per grid."""
        if self.cfg.attn_window is None:
            return None
        key = (grid_h, grid_w, num_prefix, device)
        if key not in self._masks:
            self._masks[key] = local_window_mask(
                grid_h, grid_w, self.cfg.attn_window, num_prefix, device
            )
        return self._masks[key]

    def forward_features(
        self, images: torch.Tensor, cond: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """images: (B, C, H, W); cond: (B or 1, cond_dim) or None (`cond_default`).  Returns
        pooled (B, D), tokens (B, N, D)."""
        return self._features(images, cond, pooled_only=False)

    def forward_pooled(
        self, images: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`forward_features(images, cond)["pooled"]` (B, D) for less work: pooled at the class
        token, the last block computes that token's row only (`Transformer` rows)."""
        return self._features(images, cond, pooled_only=True)["pooled"]

    def _features(
        self, images: torch.Tensor, cond: torch.Tensor | None, pooled_only: bool
    ) -> dict[str, torch.Tensor]:
        if cond is None:
            cond = self.cond_default
        elif self.cond_prefix is not None:
            proj = self.cond_prefix.proj
            check_cond(cond, proj.in_features, images.shape[0], weight=proj.weight)
        elif self.cfg.cond_dim:
            weight = self.patch_embed.proj.weight  # the blocks' dtype
            check_cond(cond, self.cfg.cond_dim, images.shape[0], weight=weight)
        else:  # it was dropped: the plain features came back for any cond
            raise ValueError(
                "this vision tower is not conditioned (vision.cond_dim and cond_tokens unset), "
                "so nothing reads cond: pass cond=None"
            )
        p = self.cfg.patch_size
        grid_h, grid_w = images.shape[-2] // p, images.shape[-1] // p
        x = self.patch_embed(images)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        pos = self._abs_pos(grid_h, grid_w, x.device)
        if pos is not None:
            x = x + pos.to(x.dtype)
        num_prefix = self.num_prefix
        if cond is not None and self.cond_prefix is not None:
            # (B, k, D), after the class token; a (1, C) condition (one prompt) serves every
            # image, as it does in the adaLN blocks and the projector
            prefix = self.cond_prefix(cond).to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, : self.num_prefix], prefix, x[:, self.num_prefix :]], dim=1)
            num_prefix += prefix.shape[1]
        x = self.norm_pre(x)
        cls_only = pooled_only and self.cfg.pool == "token"
        x = self.trunk(
            x,
            cond,
            is_causal=False,
            attn_mask=self._attn_mask(grid_h, grid_w, num_prefix, x.device),
            rope=self._rope(grid_h, grid_w, x.device),
            rows=x.new_zeros(x.shape[0], dtype=torch.long) if cls_only else None,
        )
        x = self.norm(x)  # (B, P + N, D), or (B, 1, D): the class token's row
        if cls_only:
            return {"pooled": x[:, 0]}
        tokens = x[:, num_prefix:]
        pooled = x[:, 0] if self.cfg.pool == "token" else tokens.mean(dim=1)
        return {"pooled": pooled, "tokens": tokens}

    def encode(self, images: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, C, H, W) -> (B, E): pooled features through the projection, if any."""
        pooled = self.forward_pooled(images, cond)
        return self.proj(pooled) if self.proj is not None else pooled

    forward = encode

    @property
    def num_patches(self) -> int:
        """Patch tokens per image at the configured size: grid ** 2 (prefix tokens not counted)."""
        return self.grid**2

    def flops_per_image(self) -> float:
        """Forward FLOPs (2 per multiply-add) of one image at the configured size."""
        c = self.cfg
        n = self.num_prefix + self.grid**2
        per_block = 2 * n * c.dim * c.dim * (4 + 2 * c.block.mlp_ratio) + 4 * n * n * c.dim
        patch = 2 * self.grid**2 * c.in_chans * c.patch_size**2 * c.dim
        return (
            c.depth * per_block
            + patch
            + (0 if self.proj is None else 2 * c.dim * self.proj.out_features)
        )
