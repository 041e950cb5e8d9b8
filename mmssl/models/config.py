"""Architecture configs: every field and default of every model lives here.

Named architectures (configs/*.json) and recipes only list what differs from these
defaults.  Field names follow one vocabulary: dim, depth, num_heads, mlp_ratio, drop_path,
patch_size, vocab_size, context_length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from mmssl.schema import ConfigError, to_dict


@dataclass
class BlockConfig:
    """Options of the shared `mmssl.nn.Block`, identical for every tower."""

    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-6
    mlp: Literal["mlp", "swiglu"] = "mlp"
    act: Literal["gelu", "gelu_tanh", "quick_gelu", "silu", "relu"] = "gelu"
    mlp_bias: bool = True
    init_values: float | None = None  # LayerScale; None or 0 = off (as in timm)
    drop_path: float = 0.0

    def __post_init__(self) -> None:
        # the rate of the deepest block (`nn.block.Transformer` spreads 0..drop_path over depth)
        if not 0.0 <= self.drop_path <= 1.0:  # NaN too
            raise ValueError(f"block.drop_path must be in [0, 1], got {self.drop_path}")


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    block: BlockConfig = field(default_factory=BlockConfig)
    patch_bias: bool = True
    class_token: bool = True
    # learned: an absolute table; sincos: fixed 2-D; rope: 2-D rotary in attention (relative
    # positions; with `attn_window` the token grid is then exactly shift-equivariant); none.
    pos_embed: Literal["learned", "sincos", "rope", "none"] = "learned"
    pre_norm: bool = False  # a norm before the blocks (OpenAI CLIP's ln_pre)
    pool: Literal["token", "mean"] = "token"
    cond_dim: int | None = None  # adaLN-Zero conditioning of the blocks; None = unconditioned
    cond_depth: int | None = None  # condition only the top k blocks; None = all
    # condition tokens prepended to the patch tokens (needs `condition`).  The one route that
    # is not neutral at init: the tokens join attention from the first step, so features
    # differ from the unconditioned model's (adaLN-Zero and the conditioned projector start
    # equal to it)
    cond_tokens: int = 0
    # Local attention: a patch token attends only to the patch tokens within this grid
    # (Chebyshev) distance.  With rope and no absolute table, the patch tokens farther than
    # depth * attn_window from the border are then exactly equivariant to whole-patch shifts
    # (global attention is not: every token sees the border).  Prefix tokens (class token,
    # cond_tokens) attend to everything, but patch tokens never attend to them, so they stay
    # readers.  None = global attention.
    attn_window: int | None = None
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check_positive(self, ["image_size", "patch_size", "in_chans", "dim", "depth", "num_heads"])
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.pool == "token" and not self.class_token:
            raise ValueError("pool='token' needs class_token=true")
        if self.attn_window is not None and self.attn_window < 0:
            raise ValueError(f"attn_window must be >= 0 or null, got {self.attn_window}")
        if self.attn_window is not None and self.cond_tokens and self.pool == "mean":
            raise ValueError(
                "attn_window with cond_tokens and pool='mean': patch tokens never attend to the "
                "prefix, so the condition tokens would have no effect"
            )


@dataclass
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    dim: int = 512
    depth: int = 12
    num_heads: int = 8
    block: BlockConfig = field(default_factory=lambda: BlockConfig(norm_eps=1e-5))
    pos_embed: Literal["learned", "rope"] = "learned"
    causal: bool = True
    # eot: the last valid token of each row (the end-of-text token), as the CLIP text tower.
    pool: Literal["eot", "mean"] = "eot"
    lm_head: bool = True
    tie_embeddings: bool = True
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check_positive(self, ["vocab_size", "context_length", "dim", "depth", "num_heads"])


@dataclass
class CaptionConfig:
    """A caption decoder (CoCa style) on top of the text tower.

    cross: `depth` extra Blocks with cross-attention to the image tokens.
    prefix: image tokens are prepended to the text and run causally through the text tower.
    """

    mode: Literal["cross", "prefix"] = "cross"
    depth: int = 2


@dataclass
class ConditionConfig:
    """Where the condition vector c comes from (see models/condition.py)."""

    source: Literal["descriptor", "text"] = "descriptor"
    layout: str = "v1"  # augmentation descriptor layout version (source "descriptor")
    dim: int = 64  # size of c
    hidden_dim: int = 128  # hidden width of the descriptor MLP

    def __post_init__(self) -> None:
        from mmssl.descriptor import LAYOUTS

        if self.layout not in LAYOUTS:
            raise ValueError(
                f"layout {self.layout!r} is no augmentation descriptor version; "
                f"known: {sorted(LAYOUTS)}"
            )


@dataclass
class ProjectorConfig:
    """The SSL projection head on the pooled image features (SimCLR); optionally conditioned."""

    hidden_dim: int = 512
    out_dim: int = 128
    depth: int = 2
    cond: Literal["none", "concat", "film", "hyper"] = "none"
    hyper_rank: int = 32  # K, the number of zero-initialised weight components (cond "hyper")


@dataclass
class ModelConfig:
    vision: VisionConfig | None = None
    text: TextConfig | None = None
    # Joint space of encode_image / encode_text: each tower gets a bias-free projection to it.
    # None: no projection, and encode_* return the pooled features.
    embed_dim: int | None = None
    shared_trunk: bool = False  # one Transformer runs image tokens and (causally) text tokens
    logit_scale_init: float = 2.659260036932778  # log(1 / 0.07)
    caption: CaptionConfig | None = None
    projector: ProjectorConfig | None = None
    condition: ConditionConfig | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.vision is None and self.text is None:
            raise ValueError("a model needs a vision tower, a text tower, or both")
        if self.shared_trunk:
            v, t = self.vision, self.text
            if v is None or t is None:
                raise ValueError("shared_trunk needs both a vision and a text tower")
            for name in ("dim", "depth", "num_heads"):
                if getattr(v, name) != getattr(t, name):
                    raise ValueError(
                        f"shared_trunk needs vision.{name} == text.{name}, "
                        f"got {getattr(v, name)} and {getattr(t, name)}"
                    )
            if v.block != t.block:
                raise ValueError("shared_trunk needs vision.block == text.block")
        if self.caption is not None and (self.vision is None or self.text is None):
            raise ValueError("a caption decoder needs both a vision and a text tower")
        if self.caption is not None and not self.text.causal:  # type: ignore[union-attr]
            # both modes read the text tower's hidden state at t, which would have seen
            # token t + 1, the very target it is scored against
            raise ValueError("a caption decoder needs a causal text tower (text.causal=true)")
        if self.caption is not None and not self.text.lm_head:  # type: ignore[union-attr]
            # both modes score their hidden states with the text tower's LM head
            raise ValueError("a caption decoder needs the text tower's LM head (text.lm_head=true)")
        if self.projector is not None and self.vision is None:
            raise ValueError("a projector needs a vision tower (it maps the pooled image features)")
        self._check_condition()

    def _check_condition(self) -> None:
        v, c = self.vision, self.condition
        users = []
        if v is not None and v.cond_dim:
            users.append("vision.cond_dim")
        if v is not None and v.cond_tokens:
            users.append("vision.cond_tokens")
        if self.projector is not None and self.projector.cond != "none":
            users.append("projector.cond")
        if users and c is None:
            raise ValueError(f"{', '.join(users)} need a `condition` section")
        if c is None:
            return
        if v is None:
            raise ValueError("condition needs a vision tower to condition")
        if v.cond_dim and v.cond_dim != c.dim:
            raise ValueError(f"vision.cond_dim ({v.cond_dim}) must equal condition.dim ({c.dim})")
        if c.source == "text" and self.text is None:
            raise ValueError("condition.source 'text' needs a text tower")


def _check_positive(cfg: object, names: list[str]) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")


# model fields that are sizes or strengths, by the least value each may take
_MIN = {
    **dict.fromkeys(
        ("dim", "depth", "num_heads", "patch_size", "image_size", "vocab_size", "context_length"),
        1,
    ),
    **dict.fromkeys(("embed_dim", "in_chans", "cond_dim", "cond_depth"), 1),
    **dict.fromkeys(("hidden_dim", "out_dim"), 1),  # condition and projector widths
    "cond_tokens": 0,
    "attn_window": 0,  # a token attends to itself (and the prefix) only
}
_POSITIVE = ("mlp_ratio", "norm_eps", "init_std")


def check_values(cfg: ModelConfig) -> None:
    """Every number finite and every size or strength in range: what the dataclasses' own
    checks leave to a whole config (create_model, recipes and loading all run it).  A
    ConfigError names `model.<path>`."""

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{where}.{k}")
            return
        key = where.rsplit(".", 1)[-1]
        if isinstance(node, bool) or not isinstance(node, (int, float)):
            return
        if not math.isfinite(node):  # JSON reads NaN: a NaN norm_eps gave NaN features
            raise ConfigError(f"{where} must be a finite number, got {node}")
        if key in _MIN and node < _MIN[key]:
            raise ConfigError(f"{where} must be >= {_MIN[key]}, got {node}")
        if key in _POSITIVE and not node > 0:
            raise ConfigError(f"{where} must be > 0, got {node}")
        if key == "drop_path" and not 0 <= node <= 1:  # as BlockConfig and Transformer
            raise ConfigError(f"{where} must be in [0, 1], got {node}")

    walk(to_dict(cfg), "model")
    v = cfg.vision
    if v is not None and v.cond_depth is not None and v.cond_depth > v.depth:
        # more than depth conditioned every block, as None does, without a word
        raise ConfigError(
            f"model.vision.cond_depth must be <= vision.depth ({v.depth}), got {v.cond_depth}"
        )
