"""Checks of a recipe's `objectives` section against its data sources and its model: what
each objective needs (views, text, a tower, a decoder), the options each one reads, and the
combinations that would train silently on the wrong thing; and of its `eval.sources`, which
must be held out.  Called by `recipe.validate`.
"""

from __future__ import annotations

from typing import Any

from mmssl.data.augment import is_real
from mmssl.descriptor import PIPELINE_LAYOUT, get_layout
from mmssl.schema import ConfigError, suggest
from mmssl.train.recipe import NEEDS, SOURCE_PROVIDES, ObjectiveConfig, Recipe

# the objective options each loss reads; setting one on another objective is an error
OPTION_USERS = {
    "positives": ("simclr", "clip", "siglip"),
    "temperature": ("simclr", "hssl"),
    "projector_dim": ("simclr", "hssl"),
    "max_logit_scale": ("clip",),
    "label_smoothing": ("next_token", "captioning"),
    "fused_head": ("next_token", "captioning"),
    "hidden": ("augself",),
    "group_weights": ("augself",),
    "window": ("hssl",),
    "displacement": ("hssl",),
    "structure": ("hssl",),
}


def check_objectives(recipe: Recipe, cfg: Any) -> None:
    """Each objective against its data source, the model (`cfg`, the resolved ModelConfig)
    and the options it reads; a ConfigError names `objectives.KEY`."""
    if not recipe.objectives:
        raise ConfigError("objectives: a recipe needs at least one objective")
    if all(o.weight == 0 for o in recipe.objectives.values()):  # a weight of 0 is an ablation
        raise ConfigError("objectives: every weight is 0, so the loss is 0 and nothing is learnt")
    sources = recipe.data.sources
    unset = ObjectiveConfig()
    for key, obj in recipe.objectives.items():
        where = f"objectives.{key}"
        kind = obj.type or key
        if obj.source not in sources:
            raise ConfigError(
                f"{where}.source: no data source {obj.source!r}"
                f"{suggest(obj.source, sources)}; sources: {sorted(sources)}"
            )
        if obj.weight < 0:
            raise ConfigError(f"{where}.weight must be >= 0, got {obj.weight}")
        for option, users in OPTION_USERS.items():
            if kind not in users and getattr(obj, option) != getattr(unset, option):
                raise ConfigError(
                    f"{where}.{option}: {kind} does not use it (only {', '.join(users)} do)"
                )
        needs = NEEDS[kind] | ({"text"} if obj.positives == "caption" else set())
        missing = needs - SOURCE_PROVIDES[sources[obj.source].kind]
        if missing:
            what = f"{kind} with positives=caption" if obj.positives == "caption" else kind
            raise ConfigError(
                f"{where}: {what} needs {sorted(missing)} but source {obj.source!r} is "
                f"{sources[obj.source].kind!r}"
            )
        if "views" in NEEDS[kind] and recipe.data.views < 2:
            raise ConfigError(f"{where}: {kind} needs two views; set data.views=2")
        if (
            kind == "hssl"
            and cfg.vision is not None
            and cfg.vision.pos_embed not in ("rope", "none")
        ):
            raise ConfigError(
                f"{where}: hssl needs vision.pos_embed rope or none (an absolute table breaks "
                f"the shift equivariance its fibers rely on); set vision.attn_window for exactness"
            )
        if (
            kind in ("simclr", "augself", "clip", "siglip", "captioning", "hssl")
            and cfg.vision is None
        ):
            raise ConfigError(f"{where}: {kind} needs a vision tower; model has none")
        if (
            kind == "augself"
            and cfg.condition is not None
            and cfg.condition.source == "descriptor"
            and cfg.vision is not None
            and (cfg.vision.cond_dim or cfg.vision.cond_tokens)
        ):
            raise ConfigError(
                f"{where}: augself predicts the views' descriptor difference from backbone "
                f"features, but vision.cond_dim/cond_tokens feed that descriptor to the backbone, "
                f"so the head would read it back; condition the projector instead "
                f"(model projector.cond) or drop augself"
            )
        if obj.group_weights:
            _check_group_weights(obj.group_weights, f"{where}.group_weights")
        if (
            obj.projector_dim is not None
            and cfg.projector is not None
            and cfg.projector.cond != "none"
        ):
            # the task-owned head replaces the model's projector, and with it the condition
            # the projector was to read: the run would be plain SimCLR, its conditioning
            # untrained (and `eval sensitivity` would probe the untrained projector)
            raise ConfigError(
                f"{where}.projector_dim: a head of its own replaces the model's conditioned "
                f"projector (projector.cond={cfg.projector.cond!r}), whose conditioning would "
                f"then never train; drop projector_dim to train the model's projector"
            )
        if kind in ("clip", "siglip", "captioning", "next_token") and cfg.text is None:
            raise ConfigError(f"{where}: {kind} needs a text tower; model has none")
        if kind in ("clip", "siglip") and cfg.embed_dim is None and cfg.vision.dim != cfg.text.dim:
            raise ConfigError(f"{where}: {kind} needs embed_dim or equal tower dims")
        if kind == "captioning" and cfg.caption is None:
            raise ConfigError(f"{where}: captioning needs a caption decoder (model caption)")
        if kind == "next_token" and not cfg.text.lm_head:
            raise ConfigError(f"{where}: next_token needs the text tower's lm_head=true")
        if kind == "next_token" and not cfg.text.causal:
            # a bidirectional tower's hidden state at t attends to token t + 1, the target it
            # is scored against, so it can copy the answer instead of learning to predict it
            raise ConfigError(
                f"{where}: next_token needs a causal text tower, but model text.causal is "
                f"false (its tokens would see the targets they predict); set "
                f"model.overrides.text.causal=true or drop next_token"
            )
        allowed = {
            "simclr": ("local_loss", "full"),
            "hssl": ("local_loss", "full"),
            "clip": ("local_loss", "full"),
            "siglip": ("chunked", "local_loss", "full"),
        }.get(kind, ())
        if obj.gather is not None and obj.gather not in allowed:
            raise ConfigError(f"{where}.gather: {obj.gather!r} is not one of {list(allowed)}")
        if obj.temperature <= 0:
            raise ConfigError(f"{where}.temperature must be > 0, got {obj.temperature}")
    _check_solarize(recipe, cfg)


def _check_solarize(recipe: Recipe, cfg: Any) -> None:
    """Solarize has no slot in the v1 descriptor (`mmssl.data.augment`): a solarized view's
    descriptor equals the unsolarized one's, so a model conditioned on descriptors, or
    AugSelf predicting them, would be told the image is unchanged while it was inverted."""
    readers = [
        f"objectives.{k} (augself)"
        for k, o in recipe.objectives.items()
        if (o.type or k) == "augself" and o.weight  # weight 0: an ablation, nothing read
    ]
    if cfg.condition is not None and cfg.condition.source == "descriptor":
        readers.append("the model's descriptor conditioning")
    data = recipe.data
    views = [
        (f"data.view_augment[{i}]", {**data.augment, **dict(v)})
        for i, v in enumerate(data.view_augment)
    ] or [("data.augment", data.augment)]
    for where, augment in views:
        p = augment.get("solarize_p", 0)
        if readers and is_real(p) and p > 0:
            raise ConfigError(
                f"{where}: solarize_p {p} with {' and '.join(readers)}: the v1 descriptor has "
                "no solarize slot, so a solarized view reads as unchanged; set solarize_p 0"
            )


def check_eval(recipe: Recipe) -> None:
    """`eval.sources` against the data sources: each names one (checked before the sources
    no one reads, which a typo here makes), and with eval on maps every training source to a
    held-out one of its kind that is neither read by an objective nor shares its shards."""
    ev, sources = recipe.eval, recipe.data.sources
    read = {o.source for o in recipe.objectives.values()} | set(ev.sources.values())
    for train_src, held_out in ev.sources.items():  # first: a typo here makes the real one unread
        if held_out not in sources:
            raise ConfigError(
                f"eval.sources.{train_src}: no data source {held_out!r}{suggest(held_out, sources)}"
            )
    for name in sources:
        if name not in read:  # often a mistyped key: data.sources.trian.mode=epoch
            raise ConfigError(
                f"data.sources.{name}: no objective or eval.sources reads it{suggest(name, read)}"
            )
    if ev.every:
        used = {o.source for o in recipe.objectives.values()}
        if set(ev.sources) != used:
            raise ConfigError(
                f"eval.sources must map every training source {sorted(used)} to "
                f"a held-out source, got {sorted(ev.sources)}"
            )
        for train_src, held_out in ev.sources.items():
            if held_out in used:
                raise ConfigError(
                    f"eval.sources.{train_src}: {held_out!r} is a training source (an objective "
                    "reads it), not held out"
                )
            shared = _shared_shards(sources[held_out].urls, [sources[u].urls for u in used])
            if shared:
                raise ConfigError(
                    f"eval.sources.{train_src}: {held_out!r} shares shards with a training "
                    f"source ({shared}), so it is not held out"
                )
            if sources[held_out].kind != sources[train_src].kind:
                raise ConfigError(
                    f"eval.sources.{train_src}: {held_out!r} is a "
                    f"{sources[held_out].kind} source, {train_src!r} is "
                    f"{sources[train_src].kind}"
                )


def _shared_shards(urls: str, others: list[str]) -> str | None:
    """The first shard URL of pattern `urls` that one of `others` also lists, or None
    (synthetic sources and patterns that do not expand are left to their own checks)."""
    from mmssl.data.urls import expand_urls

    if urls == "synthetic":
        return None
    try:
        mine = expand_urls(urls)
        theirs = {u for o in others if o != "synthetic" for u in expand_urls(o)}
    except ValueError:
        return None
    return next((u for u in mine if u in theirs), None)


def _check_group_weights(weights: dict[str, float], where: str) -> None:
    """AugSelf's per-group weights: groups of the v1 descriptor, >= 0, not all 0."""
    names = get_layout(PIPELINE_LAYOUT).names
    for name, w in weights.items():
        if name not in names:
            raise ConfigError(
                f"{where}: no descriptor group {name!r}{suggest(name, names)}; groups: {list(names)}"
            )
        if not w >= 0:
            raise ConfigError(f"{where}.{name} must be >= 0, got {w}")
    if all(weights.get(n, 1.0) == 0 for n in names):
        raise ConfigError(f"{where}: every group weighs 0, so augself's loss is 0")
