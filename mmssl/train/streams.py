"""The recipe's data sources as resumable batch streams, one per source and rank.

Each step draws one micro-batch from every source (the Task weighs the objectives), so each
source is its own `mmssl.data` pipeline with its own position.  `urls: synthetic` is a
generated stream (class prototypes plus noise, captions naming the class) for smoke runs,
benchmarks and tests that need no shards.
"""

from __future__ import annotations

import logging
import os
import zlib
from typing import Any

import torch

from mmssl.descriptor import PIPELINE_LAYOUT
from mmssl.schema import ConfigError, from_dict
from mmssl.train.recipe import Recipe, SourceConfig

# The seeding of the recipe's sources, written into every checkpoint's run record
# (`run_record.record`): 1 gave every source `data.seed`, so two sources over shards of equal
# count drew the same shard indices in lockstep; 2 gives every used loader source after the
# first its own seed (`source_seeds`).
SOURCE_SEEDING = 2

# LM rows are context_length + 1 tokens long in the data pipeline: the model reads the first
# context_length, and every one of its positions has a target (the Task's `packed` sources).


def packed_sources(recipe: Recipe) -> list[str]:
    """The sources whose batches are packed LM rows (`Task`'s `packed`): the text ones."""
    return [name for name, src in recipe.data.sources.items() if src.kind == "text"]


class LoaderStream:
    """An `mmssl.data` StreamLoader as an endless `next()`; epochs roll over."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._it: Any = None

    def next(self) -> dict[str, Any]:
        """The next batch dict, starting the next epoch when one ends; RuntimeError for a source
        with no batches."""
        # starting a DataLoader draws its base seed from the global torch RNG; shielding it
        # keeps the training randomness (drop_path) independent of when loaders (re)start,
        # which a resumed run does at another step than an uninterrupted one
        with torch.random.fork_rng(devices=[]):
            for _ in range(2):
                if self._it is None:
                    self._it = iter(self.loader)
                try:
                    return next(self._it)
                except StopIteration:
                    self._it = None
        raise RuntimeError("data source yields no batches in an epoch")

    def close(self) -> None:
        """Stop the loader's worker processes (the position is kept: `state_dict` still works)."""
        if self._it is not None:
            self._it.close()  # ends StreamLoader.__iter__, which drops its DataLoader iterator
            self._it = None

    def state_dict(self) -> dict[str, Any]:
        """The loader's position (`StreamLoader.state_dict`)."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`; the next `next()` starts a new iterator."""
        self.loader.load_state_dict(state)
        self._it = None

    @property
    def skipped(self) -> dict[str, int]:
        """Bad samples skipped so far, by kind."""
        return dict(self.loader.skipped)


class SyntheticStream:
    """Deterministic generated batches: 10 classes, each an image prototype plus noise and a
    caption [bos, 3 + class, eos]; text sources are random token rows.  Position = index.

    `seed` makes the prototypes (the dataset) and the draws; `held_out` > 0 (an eval
    stream's `seed_offset`) draws other samples of the same prototypes: a held-out stream
    seeded seed + 1 was another dataset, its loss rising above chance as training fit."""

    def __init__(
        self,
        kind: str,
        batch_size: int,
        image_size: int,
        views: int,
        context_length: int,
        vocab_size: int,
        seed: int,
        rank: int,
        held_out: int = 0,
    ) -> None:
        self.held_out = held_out
        self.kind, self.batch_size, self.image_size, self.views = (
            kind,
            batch_size,
            image_size,
            views,
        )
        self.context_length, self.vocab_size = context_length, vocab_size
        self.seed, self.rank, self.index = seed, rank, 0
        g = torch.Generator().manual_seed(seed)
        self.protos = torch.rand(10, 3, image_size, image_size, generator=g)

    def next(self) -> dict[str, Any]:
        """The batch at the current index: image (B, 3, S, S), label (B,), and views with their aug
        (B, 13) when views > 0, text and text_mask (B, T) for image_text; text sources give only
        text and text_mask (B, T + 1), packed rows as the pipeline's."""
        key: tuple[int, ...] = (self.seed, self.rank, self.index)
        if self.held_out:
            key = (self.seed, -self.held_out, self.rank, self.index)
        g = torch.Generator().manual_seed(hash(key) % 2**62)
        self.index += 1
        b = self.batch_size
        if self.kind == "text":
            text = torch.randint(3, self.vocab_size, (b, self.context_length + 1), generator=g)
            return {"text": text, "text_mask": torch.ones_like(text, dtype=torch.bool)}
        label = torch.randint(0, 10, (b,), generator=g)
        image = self.protos[label]

        def noisy() -> torch.Tensor:
            return (image + 0.2 * torch.randn(image.shape, generator=g)).clamp(0, 1)

        batch: dict[str, Any] = {"image": noisy(), "label": label}
        if self.views:
            batch["views"] = [noisy() for _ in range(self.views)]
            batch["aug"] = [torch.rand(b, 13, generator=g) for _ in range(self.views)]
        if self.kind == "image_text":
            text = torch.zeros(b, min(8, self.context_length), dtype=torch.long)
            text[:, 0], text[:, 1], text[:, 2] = 1, 3 + label, 2
            mask = torch.zeros_like(text, dtype=torch.bool)
            mask[:, :3] = True
            batch["text"], batch["text_mask"] = text, mask
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The position: the index of the next batch."""
        return {"synthetic": True, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`."""
        self.index = int(state["index"])

    @property
    def skipped(self) -> dict[str, int]:
        """Always empty: generated batches have no bad samples."""
        return {}

    def close(self) -> None:
        """Nothing to stop (as `LoaderStream.close`)."""


def augment_config(recipe: Recipe) -> Any:
    """The AugmentConfig of `data.augment`, or a tuple of one per view with `data.view_augment`."""
    import dataclasses

    from mmssl.data.augment import AugmentConfig

    def build(overrides: dict[str, Any], where: str) -> AugmentConfig:
        cfg = from_dict(AugmentConfig, overrides, where)
        pairs = {k: tuple(getattr(cfg, k)) for k in ("scale", "ratio", "blur_sigma")}
        return dataclasses.replace(cfg, **pairs)  # type: ignore[arg-type]

    base = dict(recipe.data.augment)
    if not recipe.data.view_augment:
        return build(base, "data.augment")
    return tuple(
        build({**base, **dict(view)}, f"data.view_augment[{i}]")
        for i, view in enumerate(recipe.data.view_augment)
    )


def tokenizer_name(recipe: Recipe) -> str:
    """`data.tokenizer` as `get_tokenizer` takes it: "default" or "clip", or a path made
    absolute (found from the working directory, else from the recipe's), so that a run, its
    resume and its export read the same file from any directory."""
    from mmssl.train.recipe import resolve_path

    name = recipe.data.tokenizer
    if name in ("default", "clip"):
        return name
    return str(resolve_path(recipe, name).resolve())


def tokenizer(recipe: Recipe) -> Any:
    """The recipe's `data.tokenizer`, loaded; ConfigError when it cannot be."""
    from mmssl.tokenizer import get_tokenizer

    name = tokenizer_name(recipe)
    try:
        return get_tokenizer(name)
    except FileNotFoundError as err:
        given = recipe.data.tokenizer
        # a relative path found nowhere: both places it was looked for ("default", "clip" or
        # an existing path without a tokenizer say their own reason)
        if (
            not os.path.exists(name)
            and name not in ("default", "clip")
            and not os.path.isabs(given)
        ):
            looked = f"{os.path.abspath(given)} or {os.path.join(recipe.base_dir, given)}"
            raise ConfigError(
                f"data.tokenizer: {given!r} is not 'default', 'clip' or a tokenizer file or "
                f"directory at {looked}"
            ) from None
        raise ConfigError(f"data.tokenizer: {err}") from None
    except ValueError as err:
        raise ConfigError(f"data.tokenizer: {err}") from None


def tokenizer_record(name: str) -> dict[str, Any] | None:
    """The metadata (`Tokenizer.metadata`: kind, ids, sha256 of its file) of tokenizer
    `name` (`tokenizer_name`), as a run pins it in each checkpoint's run record; None when
    it does not load."""
    from mmssl.tokenizer import get_tokenizer

    try:
        meta = dict(get_tokenizer(name).metadata)
    except (FileNotFoundError, ValueError):
        return None
    meta["name"] = name
    return meta


def source_sizes(recipe: Recipe, src: SourceConfig, model_cfg: Any) -> tuple[int, int]:
    """(image size, text context length) that source `src` feeds the model (`mmssl plan`
    counts its work from the same)."""
    image = recipe.data.image_size or (model_cfg.vision.image_size if model_cfg.vision else 32)
    context = (
        src.context_length
        or recipe.data.context_length
        or (model_cfg.text.context_length if model_cfg.text else 77)
    )
    return image, context


def check_data(recipe: Recipe, model_cfg: Any, world_size: int) -> None:
    """Pre-flight of what the streams will need: augmentation keys, tokenizer vocabulary,
    and batches and fibers that give a contrastive objective a real problem."""
    augment_config(recipe)
    _check_contrastive_batch(recipe, world_size)
    cond = model_cfg.condition
    if cond is not None and cond.source == "descriptor" and cond.layout != PIPELINE_LAYOUT:
        # the model would read the pipeline's descriptors, and its neutral one, by its own layout
        raise ConfigError(
            f"model condition.layout {cond.layout!r}: the data pipeline writes descriptor "
            f"layout {PIPELINE_LAYOUT!r}, which the model would read as {cond.layout!r}"
        )
    _triple(recipe.data.mean, "data.mean")
    _triple(recipe.data.std, "data.std")
    v = model_cfg.vision
    if v is not None and recipe.data.image_size and recipe.data.image_size % v.patch_size:
        raise ConfigError(
            f"data.image_size {recipe.data.image_size} is not divisible by the model's "
            f"patch_size {v.patch_size}"
        )
    for key, obj in recipe.objectives.items():
        if (obj.type or key) != "hssl":
            continue
        # HSSLLoss takes k=0 (the sampler's limit case); a run with it draws the first fiber
        # twice, so both positives are one vector and nothing invariant is learnt
        if obj.displacement == 0:
            raise ConfigError(
                f"objectives.{key}.displacement 0 makes both positives the same fiber; "
                f"use >= 1, or leave it unset for any two positions"
            )
        if v is not None:
            grid = (recipe.data.image_size or v.image_size) // v.patch_size
            if obj.window > grid:
                raise ConfigError(
                    f"objectives.{key}.window {obj.window} exceeds the {grid}x{grid} patch grid "
                    f"of the images (image size / the model's patch_size {v.patch_size})"
                )
            if obj.window == grid:  # one fiber: the same silent no-positive case
                raise ConfigError(
                    f"objectives.{key}.window {obj.window} equals the {grid}x{grid} patch grid, "
                    f"so there is one fiber and both positives are the same; use a smaller window"
                )
    if model_cfg.text is not None:
        for name, src in recipe.data.sources.items():
            context = source_sizes(recipe, src, model_cfg)[1]
            if context > model_cfg.text.context_length:
                raise ConfigError(
                    f"data.sources.{name}: context length {context} exceeds the model's text "
                    f"context_length {model_cfg.text.context_length}"
                )
    # the text sources read it, and a text tower's run pins it for its export (evaluation
    # refuses a tokenizer with more ids than the tower); synthetic data has its own ids
    real = [s for s in recipe.data.sources.values() if s.urls != "synthetic"]
    if any(s.kind != "image" for s in real) or model_cfg.text is not None:
        tok = tokenizer(recipe)
        if real and model_cfg.text is not None and tok.vocab_size > model_cfg.text.vocab_size:
            raise ConfigError(
                f"data.tokenizer {recipe.data.tokenizer!r} has {tok.vocab_size} ids but the "
                f"model's text vocab_size is {model_cfg.text.vocab_size}; set "
                f"model.overrides.text.vocab_size={tok.vocab_size}"
            )


# the objectives that score each sample against the others of its batch
CONTRASTIVE = ("simclr", "clip", "siglip", "hssl")


def _check_contrastive_batch(recipe: Recipe, world_size: int) -> None:
    """ConfigError when a contrastive objective would see one sample per batch.

    Each micro-batch, gathered across ranks, is its own contrastive problem (`recipe`'s
    docstring).  With one sample, NT-Xent (simclr, hssl) and CLIP softmax over the positive
    alone: loss exactly 0, no gradient, a run that trains nothing.  SigLIP keeps only its
    positive term, which a constant embedding minimises."""
    t = recipe.train
    on = [k for k, o in recipe.objectives.items() if (o.type or k) in CONTRASTIVE and o.weight]
    per_step = t.micro_batch_size * world_size
    if on and 2 <= per_step < t.global_batch_size:
        from mmssl import distributed

        if distributed.rank() == 0:  # a recipe written for more GPUs runs, but learns otherwise
            logging.getLogger("mmssl.train").warning(
                "objectives.%s is contrastive and train.global_batch_size %d is accumulated "
                "from micro-batches of %d x world size %d: its negatives come from one "
                "micro-batch across ranks (%d samples), not the global batch",
                on[0], t.global_batch_size, t.micro_batch_size, world_size, per_step,
            )  # fmt: skip
    if not on or per_step >= 2:
        return
    why = f"objectives.{on[0]} is contrastive and needs negatives from the batch"
    if t.global_batch_size < 2:
        raise ConfigError(f"train.global_batch_size must be >= 2, got {t.global_batch_size}: {why}")
    raise ConfigError(  # gradient accumulation: each micro-batch of 1 is its own problem
        f"train.micro_batch_size {t.micro_batch_size} x world size {world_size} is 1 sample "
        f"per contrastive batch (accumulation does not add negatives): {why}"
    )


def build_stream(
    name: str,
    src: SourceConfig,
    recipe: Recipe,
    model_cfg: Any,
    rank: int,
    world_size: int,
    seed_offset: int = 0,
    seed: int | None = None,
) -> Any:
    """One source's stream for this rank; `seed` (default `data.seed`) plus `seed_offset`
    (which separates eval streams) seeds it."""
    image_size, context = source_sizes(recipe, src, model_cfg)
    d, batch = recipe.data, recipe.train.micro_batch_size
    seed = d.seed if seed is None else seed
    if src.urls == "synthetic":  # the offset draws other samples of the same data
        vocab = model_cfg.text.vocab_size if model_cfg.text else 16
        return SyntheticStream(
            src.kind, batch, image_size, d.views, context, vocab, seed, rank, seed_offset
        )
    seed += seed_offset
    from mmssl.data.errors import DataError
    from mmssl.data.pipeline import Source, build_pipeline

    fields = (
        ["label"]
        if any(o.positives == "label" and o.source == name for o in recipe.objectives.values())
        else []
    )
    try:
        loader = build_pipeline(
            sources=[Source(src.urls, kind=src.kind, name=name, epoch_batches=src.epoch_batches)],
            batch_size=batch,
            mode=src.mode,
            seed=seed,
            shuffle=src.shuffle,
            rank=rank,
            world_size=world_size,
            num_workers=d.workers,
            image_size=image_size,
            num_views=d.views,
            return_image=d.views == 0,
            augment=augment_config(recipe),
            tokenizer=tokenizer(recipe) if src.kind != "image" else None,
            context_length=context,
            json_fields=fields,
            max_pixels=d.max_pixels,
            mean=_triple(d.mean, "data.mean"),
            std=_triple(d.std, "data.std"),
        )
    except DataError as err:
        raise DataError(f"data.sources.{name}: {err}") from None
    return LoaderStream(loader)


def _triple(values: list[float] | None, where: str) -> tuple[float, float, float] | None:
    if values is None:
        return None
    if len(values) != 3:
        raise ConfigError(f"{where} needs 3 numbers (R, G, B), got {values}")
    return (values[0], values[1], values[2])


def source_seed(seed: int, name: str) -> int:
    """The seed of source `name` of a recipe seeded with `seed`: stable across processes and
    machines (crc32 of the name, not `hash`), and 2**32 or more above `seed`, so never the
    seed of a recipe's first source."""
    return seed + ((zlib.crc32(name.encode("utf-8")) + 1) << 32)


def source_seeds(recipe: Recipe) -> dict[str, int]:
    """The seed of every source the objectives read, in recipe order.

    Each recipe source is a pipeline of its own (as its source 0), so its shard draws are
    keyed by (seed, rank, worker) alone: with one seed for all, two sources of equal shard
    counts (say the same image-text shards read by a CLIP and a SimCLR objective through two
    source names) drew the same shard indices in lockstep.  So every used shard source after
    the first, in recipe order, gets `source_seed(data.seed, name)`.  The first keeps
    `data.seed`, so a single-source run, and the first source of any run (the images of
    `mmssl demo`), stream as before this seeding existed (`SOURCE_SEEDING` 1), and their
    checkpoints resume; a checkpoint of a run with several shard sources saved under
    seeding 1 is refused by the run record (`run_record.check_resume`).  `synthetic`
    sources keep `data.seed`: their seed defines the generated data (the class prototypes),
    not a draw order, and they take no part in the count."""
    used = {o.source for o in recipe.objectives.values()}
    return _keyed(recipe, [name for name in recipe.data.sources if name in used])


def eval_source_seeds(recipe: Recipe) -> dict[str, int]:
    """The seed of every held-out source of `eval.sources` (by held-out name), before the
    eval streams' `seed_offset`: `source_seeds`' rule over the held-out sources in their
    order, so two of them over the same shards do not draw in lockstep either."""
    return _keyed(recipe, list(dict.fromkeys(recipe.eval.sources.values())))


def _keyed(recipe: Recipe, names: list[str]) -> dict[str, int]:
    """`data.seed` for the first shard source of `names` and for synthetic ones;
    `source_seed(data.seed, name)` for every later shard source."""
    seeds, first = {}, True
    for name in names:
        synthetic = recipe.data.sources[name].urls == "synthetic"
        keyed = not synthetic and not first
        first = first and synthetic
        seeds[name] = source_seed(recipe.data.seed, name) if keyed else recipe.data.seed
    return seeds


def build_streams(recipe: Recipe, model_cfg: Any, rank: int, world_size: int) -> dict[str, Any]:
    """Every source the objectives read, in recipe order, each with its seed of
    `source_seeds`."""
    seeds = source_seeds(recipe)
    return {
        name: build_stream(
            name, recipe.data.sources[name], recipe, model_cfg, rank, world_size, seed=seed
        )
        for name, seed in seeds.items()
    }
