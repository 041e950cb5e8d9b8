"""Task: a model plus weighted objectives; batches in, `(loss, metrics)` out.

One step runs each tower once where it can: the images of every source (all views
concatenated) go through the vision tower in one call, and the texts of every source of
the same length through the text tower in one call (a condition prompt rides along with
its source's captions; the text runs first, since the prompt conditions the images).  Every
objective then reads its rows of those features.  That shares the forward pass between
objectives (CLIP's image embedding is the first SimCLR view's) and keeps each module to one
call per step, which ZeRO-3's parameter prefetching expects.  A shared trunk is still run
twice (bidirectionally for image tokens, causally for text), which ZeRO-3 handles (tested).

The towers' own forward methods are called directly, not through `nn.Module.__call__`:
`mmssl.train.zero3` has ZeRO-3 gather the parameters those modules own for the Task's
forward, and holds each 0-d parameter as (1,).

Token-mean objectives (next_token, captioning) under gradient accumulation: the training
loop counts their targets over the whole step before its first forward (`target_counts`,
summed over micro-batches and ranks) and passes that count to every micro-batch's forward
(`StepTargets`): each micro-batch back-propagates its summed token loss divided by (step
count / micro-batches), so after the engine's 1/micro-batches the step's gradient is that of
the token mean over the step (not the mean of per-micro-batch means, which weighs a token of
short captions more); the logged mean of the micro-batches' `loss/<objective>` is the step's
token mean.  Without a `StepTargets` (evaluation, a Task called directly) each batch is
normalised by its own global count, which a step of one micro-batch gives exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmssl.models.condition import DescriptorEncoder, TextConditioner
from mmssl.models.lifting import remove_structure, translation_lift
from mmssl.models.multimodal import MultimodalModel
from mmssl.models.text import TextTransformer
from mmssl.models.text_masks import trim_padding
from mmssl.models.vision import VisionEncoder
from mmssl.objectives import (
    AugSelfHead,
    ClipLoss,
    NTXentLoss,
    SigLipLoss,
    caption_keys,
    global_token_mean,
    head_next_token_sum,
    next_token_sum,
)
from mmssl.objectives.contrastive import clamped_scale
from mmssl.objectives.hssl import HSSLLoss
from mmssl.objectives.lm import count_targets
from mmssl.schema import ConfigError
from mmssl.train import zero3
from mmssl.train.recipe import NEEDS, OBJECTIVE_TYPES, ObjectiveConfig
from mmssl.train.text_condition import PromptTokens, prompt_tokenizer, source_prompts

Batch = dict[str, Any]
# rows of one text-tower call: (source, ids (B, T), mask (B, T), is the condition prompt)
TextRows = tuple[str, Tensor, Tensor, bool]
TOKEN_MEAN = ("next_token", "captioning")  # objectives normalised by their target count
# the objectives that read the vision tower's tokens; the others read pooled features, which
# skip the last block's other rows (`forward_pooled`), as text does without
# a TOKEN_MEAN objective
VISION_TOKENS = ("hssl", "captioning")


@dataclass(frozen=True)
class StepTargets:
    """The targets of a whole optimizer step, for the token-mean objectives.

    counts: {objective key: 0-d int64 tensor on the device}, the targets of that objective in
    every micro-batch of the step on every rank; micro_batches: the step's micro-batches per
    rank (the engine's gradient accumulation steps).  Integers, so that no input cast of the
    engine can round them.
    """

    counts: dict[str, Tensor]
    micro_batches: int

    def per_micro_batch(self, key: str) -> Tensor:
        """The global count one micro-batch of `key` is normalised by (0-d float64)."""
        return self.counts[key].to(torch.float64).clamp_min(1) / self.micro_batches


class _ModelScaleClipLoss(ClipLoss):
    """ClipLoss whose temperature is the model's `logit_scale`, so export carries it."""

    def __init__(self, model: MultimodalModel, max_logit_scale: float, gather: str) -> None:
        super().__init__(max_logit_scale=max_logit_scale, gather=gather)
        del self.logit_scale
        self._model = [model]  # a list: the model must not be registered a second time

    def scale(self) -> Tensor:
        scale = self._model[0].logit_scale
        assert scale is not None
        return clamped_scale(scale.float(), self.max_logit_scale)


def _projector(dim: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, out))


class Task(nn.Module):
    """model + objectives.  forward(batches: {source: batch dict}) -> (loss, metrics).

    metrics holds detached 0-d tensors (`loss`, `loss/<objective>`, `logit_scale`), so
    nothing syncs with the host until the loop reads them at its log interval.  With
    `step_targets`, a token-mean objective's loss is this micro-batch's share of the step's
    token mean times the number of micro-batches (module docstring), so `loss` and
    `loss/<objective>` averaged over the step's micro-batches are the step's values.

    Conditioning: a descriptor-conditioned model conditions each view on its own descriptor;
    a text-conditioned one conditions the images of each source on that source's
    `condition_prompt` (`mmssl.train.text_condition`), tokenized with `tokenizer` (default:
    the default tokenizer).

    packed: the sources of packed LM rows (context_length + 1 tokens, the pipeline's text
    sources): the tower reads `text[:, :-1]`, every position with a target (nanoGPT's x, y).
    """

    def __init__(
        self,
        model: MultimodalModel,
        objectives: dict[str, ObjectiveConfig],
        tokenizer: Any | None = None,
        packed: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.model = model
        self.objectives = dict(objectives)
        self.packed = frozenset(packed)
        prompts = source_prompts(self.objectives)
        self.prompts: PromptTokens | None = None
        if prompts:
            if not isinstance(model.conditioner, TextConditioner) or model.text is None:
                raise ValueError("condition_prompt needs a text-conditioned model")
            self.prompts = PromptTokens(
                prompts, tokenizer or prompt_tokenizer(), model.text.cfg.context_length
            )
        self.losses = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        vision_dim = model.cfg.vision.dim if model.cfg.vision is not None else 0
        for key, obj in self.objectives.items():
            kind = obj.type or key
            if kind not in OBJECTIVE_TYPES:  # a recipe's are checked; a Python caller's here
                raise ValueError(
                    f"objective {key!r}: unknown type {kind!r}; one of {list(OBJECTIVE_TYPES)}"
                )
            gather = obj.gather
            if kind == "simclr":
                self.losses[key] = NTXentLoss(obj.temperature, gather or "local_loss")
                if obj.projector_dim is not None:
                    self.heads[key] = _projector(vision_dim, obj.projector_dim)
            elif kind == "clip":
                self.losses[key] = _ModelScaleClipLoss(
                    model, obj.max_logit_scale, gather or "local_loss"
                )
            elif kind == "hssl":
                self.losses[key] = HSSLLoss(
                    obj.displacement, obj.temperature, gather or "local_loss"
                )
                if obj.projector_dim is not None:
                    self.heads[key] = _projector(vision_dim, obj.projector_dim)
            elif kind == "siglip":
                self.losses[key] = SigLipLoss(gather=gather or "chunked")
            elif kind == "augself":
                self.heads[key] = AugSelfHead(
                    vision_dim, hidden=obj.hidden, weights=obj.group_weights
                )
        zero3.promote_scalar_params(self)

    # ------------------------------------------------------------------ features

    @property
    def visual(self) -> VisionEncoder:
        """The model's vision tower (validation guarantees one)."""
        assert self.model.visual is not None, "validated: objectives need a vision tower"
        return self.model.visual

    @property
    def text_tower(self) -> TextTransformer:
        """The model's text tower (validation guarantees one)."""
        assert self.model.text is not None, "validated: objectives need a text tower"
        return self.model.text

    def _uses(self, source: str, what: set[str]) -> bool:
        return any(
            o.source == source and NEEDS[o.type or k] & what for k, o in self.objectives.items()
        )

    def _reads(self, kinds: tuple[str, ...], source: str | None = None) -> bool:
        """Whether an objective of one of `kinds` (on `source`, or on any) is trained."""
        return any(
            (o.type or k) in kinds and source in (None, o.source)
            for k, o in self.objectives.items()
        )

    def _vision(
        self, batches: dict[str, Batch], prompt_pooled: dict[str, Tensor]
    ) -> dict[str, dict[str, list[Any]]]:
        """One vision call for every source that needs images -> per source, per view:
        pooled (B, D), tokens (B, N, D) (none unless a VISION_TOKENS objective is trained),
        emb (B, E), cond (B, C) or None.

        prompt_pooled: {source: (1, D_text)} pooled text features of its condition prompt."""
        names: list[tuple[str, int, int]] = []
        images: list[Tensor] = []
        conds: list[Tensor | None] = []
        for name, batch in batches.items():
            if not self._uses(name, {"image", "views"}):
                continue
            views = batch.get("views") or [batch["image"]]
            augs = batch.get("aug") if batch.get("views") else None
            names.append((name, len(views), views[0].shape[0]))
            images += views
            conds += list(augs) if augs is not None else [None] * len(views)
        if not images:
            return {}
        visual = self.visual
        cond = None
        conditioner = self.model.conditioner
        if isinstance(conditioner, TextConditioner) and self.prompts is not None:
            # every image of a source (every view) is conditioned on that source's prompt
            missing = [name for name, _, _ in names if name not in prompt_pooled]
            if missing:
                raise ValueError(f"source(s) {missing} read images but have no condition_prompt")
            cond = torch.cat(
                [
                    conditioner(prompt_pooled[name]).expand(nviews * b, -1)
                    for name, nviews, b in names
                ]
            ).to(images[0].dtype)
        elif isinstance(conditioner, DescriptorEncoder):
            # Each view is conditioned on its own descriptor (both SimCLR branches); images
            # without one (a CLIP source's plain image) get the neutral descriptor.
            neutral = conditioner.layout.neutral_tensor()
            aug = torch.cat(
                [
                    c if c is not None else neutral.expand(v.shape[0], -1)
                    for c, v in zip(conds, images)
                ]
            ).to(images[0].device, images[0].dtype)
            cond = self.model.condition(aug)
        # the projector's condition only, for a tower the conditioner does not reach
        reads = visual.cfg.cond_dim or visual.cfg.cond_tokens
        images_cat, tower_cond = torch.cat(images), cond if reads else None
        tokens = None
        if self._reads(VISION_TOKENS):
            feats = visual.forward_features(images_cat, tower_cond)
            pooled, tokens = feats["pooled"], feats["tokens"]
        else:
            pooled = visual.forward_pooled(images_cat, tower_cond)
        emb = visual.proj(pooled) if visual.proj is not None else pooled
        out: dict[str, dict[str, list[Any]]] = {}
        start = 0
        for name, nviews, b in names:
            sl = [slice(start + i * b, start + (i + 1) * b) for i in range(nviews)]
            out[name] = {
                "pooled": [pooled[s] for s in sl],
                "tokens": [tokens[s] for s in sl] if tokens is not None else [],
                "emb": [emb[s] for s in sl],
                "cond": [cond[s] if cond is not None else None for s in sl],
            }
            start += nviews * b
        return out

    def _text(
        self, batches: dict[str, Batch]
    ) -> tuple[dict[str, dict[str, Tensor | None]], dict[str, Tensor]]:
        """Text features of every source that needs text -> hidden (B, T, D) (None
        unless a TOKEN_MEAN objective reads them), emb (B, E);
        and the pooled features (1, D) of every condition prompt, by source.

        Sources of equal text length share one call; different lengths (short captions next
        to long LM rows) get one call each rather than padding captions to the LM length.
        A prompt joins the call of its source's captions (padded to their length), so the
        tower still runs once per step in the common case; a prompt longer than the captions
        gets a call of its own, whole.
        """
        rows: dict[int, list[TextRows]] = {}  # by text length T
        for name, batch in batches.items():
            if self._uses(name, {"text"}):
                text = batch["text"]
                mask = batch.get("text_mask", torch.ones_like(text, dtype=torch.bool))
                if name in self.packed:  # the row's last token is a target only
                    text, mask = text[:, :-1], mask[:, :-1]
                rows.setdefault(text.shape[1], []).append((name, text, mask, False))
        if self.prompts is not None:
            for name in self.prompts.prompts:
                if name not in batches or not self._uses(name, {"image", "views"}):
                    continue
                batch = batches[name]
                length = self.prompts.natural_length(name)  # whole, as the export records it
                if self._uses(name, {"text"}):
                    length = max(length, batch["text"].shape[1])
                device = (batch.get("views") or [batch.get("image")])[0].device
                ids, mask = self.prompts.get(name, length, device)
                rows.setdefault(length, []).append((name, ids, mask, True))
        out, prompts = {}, {}
        for group in rows.values():
            text = torch.cat([r[1] for r in group])
            mask = torch.cat([r[2] for r in group])
            text, mask = trim_padding(text, mask)  # hidden: (B_all, T' <= T, D)
            hidden = None
            if any(not r[3] and self._reads(TOKEN_MEAN, r[0]) for r in group):
                hidden = self.text_tower.forward_tokens(text, mask)
                pooled = self.text_tower.pool(hidden, mask)
            else:  # pooled features only
                pooled = self.text_tower.forward_pooled(text, mask)
            proj = self.text_tower.proj
            emb = proj(pooled) if proj is not None else pooled
            start = 0
            for name, ids, _, is_prompt in group:
                sl = slice(start, start + ids.shape[0])
                if is_prompt:
                    prompts[name] = pooled[sl]
                else:
                    out[name] = {
                        "hidden": hidden[sl] if hidden is not None else None,
                        "emb": emb[sl],
                    }
                start += ids.shape[0]
        return out, prompts

    # ------------------------------------------------------------------ losses

    def _projected(self, key: str, feats: Iterable[Tensor], conds: list) -> list[Tensor] | None:
        """Features through the objective's own head, else the model's projector, else None."""
        if key in self.heads:
            return [self.heads[key](f) for f in feats]
        if self.model.projector is not None:
            return [self.model.project(f, c) for f, c in zip(feats, conds)]
        return None

    def _keys(self, obj: ObjectiveConfig, batch: Batch) -> Tensor | None:
        if obj.positives == "caption":
            return caption_keys(batch["text"], batch.get("text_mask"))
        if obj.positives == "label":
            if batch.get("label") is None:
                raise ValueError(f"positives='label' needs labels in source {obj.source!r}")
            return batch["label"]
        return None

    def target_counts(self, batches: dict[str, Batch]) -> dict[str, int]:
        """{token-mean objective: the targets its loss scores in `batches`} (this rank's
        micro-batch; the rule of `count_targets`).  Reads only the token ids and masks: the
        loop calls it on host batches, before any forward."""
        counts = {}
        for key, obj in self.objectives.items():
            if (obj.type or key) in TOKEN_MEAN:
                batch = batches[obj.source]
                counts[key] = int(count_targets(batch["text"], batch.get("text_mask")))
        return counts

    def _loss(
        self,
        key: str,
        obj: ObjectiveConfig,
        batch: Batch,
        vis: dict,
        txt: dict,
        step_targets: StepTargets | None = None,
    ) -> Tensor:
        kind = obj.type or key
        if kind in ("simclr", "augself") and len(vis["pooled"]) != 2:
            # both are pairwise (NT-Xent over two views, a descriptor difference); recipes are
            # held to data.views=2, a batch built by hand is checked here rather than sliced
            raise ValueError(
                f"objectives.{key}: {kind} uses exactly two views, source {obj.source!r} "
                f"has {len(vis['pooled'])}"
            )
        if kind == "simclr":
            z1, z2 = self._projected(key, vis["pooled"], vis["cond"]) or vis["emb"]
            return self.losses[key](z1.float(), z2.float(), self._keys(obj, batch))
        if kind == "hssl":
            # the grid of the images trained on (data.image_size may differ from the model's):
            # the plain image, or with rendered views the first view, whose tokens it lifts
            h, w = (batch.get("views") or [batch.get("image")])[0].shape[-2:]
            p = self.visual.cfg.patch_size
            lifted = translation_lift(vis["tokens"][0], (h // p, w // p), obj.window)
            lifted = lifted if obj.structure else remove_structure(lifted)
            loss_fn = self.losses[key]
            assert isinstance(loss_fn, HSSLLoss)
            fibers = loss_fn.sample(lifted)  # both from the first view: its condition twice
            proj = self.visual.proj if self.visual.proj is not None else nn.Identity()
            f1, f2 = self._projected(key, fibers, [vis["cond"][0]] * 2) or map(proj, fibers)
            return loss_fn(f1.float(), f2.float())
        if kind in ("clip", "siglip"):
            return self.losses[key](
                vis["emb"][0].float(), txt["emb"].float(), self._keys(obj, batch)
            )
        if kind == "augself":
            f1, f2 = vis["pooled"]
            aug = batch["aug"]
            return self.heads[key](f1, f2, aug[0], aug[1])
        if kind in ("next_token", "captioning"):
            hidden = txt["hidden"]
            # the text tower ran without the all-padding trailing columns (`_text`): the
            # targets there are all padding, so dropping them changes no term of the loss
            t = hidden.shape[1] + (obj.source in self.packed)  # a packed row's last target
            mask = batch.get("text_mask")
            args = (batch["text"][:, :t], None if mask is None else mask[:, :t])
            if kind == "captioning":
                caption = self.model.caption
                assert caption is not None
                # cross mode reuses the text tower's hidden states of this step (CoCa's
                # split); prefix mode runs the text tower again, with the image prefix
                hidden = caption.hidden(
                    self.text_tower, vis["tokens"][0], *args, text_hidden=hidden
                )
            # the token mean over the global batch: ranks hold different numbers of real
            # (unpadded) tokens, so per-rank means averaged by the engine would not be it;
            # and over the whole step: so do the micro-batches of a step
            if obj.fused_head:
                weight = self.text_tower.head_weight()
                total, count = head_next_token_sum(
                    hidden, weight, *args, label_smoothing=obj.label_smoothing
                )
            else:
                logits = self.text_tower.head(hidden).float()
                total, count = next_token_sum(logits, *args, label_smoothing=obj.label_smoothing)
            count_all = step_targets.per_micro_batch(key) if step_targets is not None else None
            return global_token_mean(total, count, count_all)
        raise ValueError(f"unknown objective {kind!r}")

    def forward(
        self, batches: dict[str, Batch], step_targets: StepTargets | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """batches: {source name: batch dict of DESIGN.md} -> (weighted loss, metrics).

        step_targets: the target counts of the token-mean objectives over the whole step the
        batches are a micro-batch of (class and module docstrings); None: this batch's own."""
        text, prompt_pooled = self._text(batches)
        vision = self._vision(batches, prompt_pooled)
        total: Tensor | None = None
        metrics: dict[str, Tensor] = {}
        for key, obj in self.objectives.items():
            loss = self._loss(
                key,
                obj,
                batches[obj.source],
                vision.get(obj.source, {}),
                text.get(obj.source, {}),
                step_targets,
            )
            metrics[f"loss/{key}"] = loss.detach()
            weighted = obj.weight * loss
            total = weighted if total is None else total + weighted
        assert total is not None
        if torch.is_grad_enabled() and not total.requires_grad:  # DeepSpeed: "loss must be a
            # scalar tensor"; every parameter the objectives reach is frozen
            raise ConfigError(
                f"no trained parameter reaches the loss of {sorted(self.objectives)}: "
                "train.freeze froze every parameter these objectives use"
            )
        metrics["loss"] = total.detach()
        # the temperatures that are trained: the model's for clip objectives, and each
        # siglip objective's own scale and bias (the model's is unused there)
        for key, loss_fn in self.losses.items():
            if isinstance(loss_fn, _ModelScaleClipLoss) and self.model.logit_scale is not None:
                # the multiplier the loss uses: clamped at max_logit_scale, as exported
                metrics["logit_scale"] = loss_fn.scale().detach().reshape(())
            elif isinstance(loss_fn, SigLipLoss):
                metrics[f"logit_scale/{key}"] = (
                    loss_fn.logit_scale.detach().float().exp().reshape(())
                )
                metrics[f"logit_bias/{key}"] = loss_fn.logit_bias.detach().float().reshape(())
        return total, metrics
