"""Run recipes: typed sections over defaults, sparse YAML files and `key=value` overrides.

A recipe is `Recipe` below; a YAML file lists only what differs from the defaults.  Every
key and type is checked (`mmssl.schema.from_dict`), then `validate` checks what depends on
several sections (objectives against the model and the sources, batch arithmetic, shard
existence, the DeepSpeed JSON), all before anything is written.

Contrastive losses and gradient accumulation: with `train.global_batch_size` larger than
`micro_batch_size x world_size`, each micro-batch is its own contrastive problem (a sample's
negatives are the rest of its micro-batch across ranks, not the global batch), so
accumulation changes the objective: its gradient is the average of smaller-batch losses.
Recipes that care set `global_batch_size = micro_batch_size x world_size`, as clip_vit_b16.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Literal

import yaml

from mmssl.models.config import ModelConfig
from mmssl.schema import ConfigError, apply_overrides, from_dict, load_yaml, to_dict

OBJECTIVE_TYPES = ("simclr", "clip", "siglip", "next_token", "captioning", "augself", "hssl")
# what each objective reads from its source's batch
NEEDS = {
    "simclr": {"views"},
    "augself": {"views"},
    "clip": {"image", "text"},
    "siglip": {"image", "text"},
    "captioning": {"image", "text"},
    "next_token": {"text"},
    "hssl": {"image"},
}
SOURCE_PROVIDES = {
    "image_text": {"image", "text", "views"},
    "image": {"image", "views"},
    "text": {"text"},
}


@dataclass
class ModelSection:
    """A named architecture (see `mmssl.list_models()`) or JSON path, with nested overrides."""

    name: str = "test_tiny_clip"
    # a partial ModelConfig over the named one's: `model.overrides.vision={...}` on the command
    # line merges into the recipe's vision overrides (`schema.apply_overrides`)
    overrides: dict[str, Any] = field(default_factory=dict, metadata={"schema": ModelConfig})


@dataclass
class SourceConfig:
    """One data source.  urls: brace pattern of local or `pipe:` shards, or "synthetic"."""

    urls: str = "synthetic"
    kind: Literal["image_text", "image", "text"] = "image_text"
    mode: Literal["resampled", "epoch"] = "resampled"
    shuffle: int = 256  # block-shuffle window in samples (1: no shuffle)
    context_length: int | None = None  # None: data.context_length
    # epoch mode: batches per rank in an epoch, for shards without a manifest (pipe: URLs);
    # None: counted from the manifest or the shards
    epoch_batches: int | None = None


@dataclass
class DataConfig:
    sources: dict[str, SourceConfig] = field(default_factory=lambda: {"train": SourceConfig()})
    image_size: int | None = None  # None: the model's vision image_size
    views: int = 0  # augmented views per image (2 for SimCLR/AugSelf); 0: no views
    # overrides of mmssl.data.augment.AugmentConfig (SimCLR/CASSLE defaults), e.g. hue: 0.0
    augment: dict[str, Any] = field(default_factory=dict)
    # per-view overrides on top of `augment`, one dict per view (BYOL-style asymmetric
    # views, e.g. [{}, {hue: 0.5}]); empty: every view uses `augment`
    view_augment: list[dict[str, Any]] = field(default_factory=list)
    mean: list[float] | None = None  # per-channel normalisation; None: images in [0, 1]
    std: list[float] | None = None
    tokenizer: str = "default"
    context_length: int | None = None  # None: the model's text context_length
    # data-loader worker processes per rank; max(1, workers) slots each read their own run
    # of the shards, so the count changes the order of the batches (0 and 1 agree)
    workers: int = 0
    # images above this many pixels are counted image_too_large skips (decompression bombs);
    # a 61 MP camera photo needs more
    max_pixels: int = 50_000_000
    seed: int = 0


@dataclass
class ObjectiveConfig:
    """One weighted loss.  `type` defaults to the objective's key in `objectives`."""

    type: str | None = None
    weight: float = 1.0
    source: str = "train"
    temperature: float = 0.1  # simclr
    gather: str | None = None  # None: the loss's default ("local_loss", "chunked" for siglip)
    # positives beyond the matching pair: identical caption ids (a no-op for clip), equal labels
    positives: Literal["pair", "caption", "label"] = "pair"
    max_logit_scale: float = 100.0  # clip
    label_smoothing: float = 0.0  # next_token, captioning
    # next_token, captioning: the LM head and the cross-entropy as one op
    # (mmssl/nn/linear_ce.py), no fp32 (B, T, V) logits; false: the plain logits path (same
    # loss, bf16 rounding aside)
    fused_head: bool = True
    projector_dim: int | None = None  # simclr: a task-owned 2-layer MLP head; None: model proj
    hidden: int = 512  # augself head width
    # augself: loss weight per descriptor group (blur, color, color_diff, crop, grayscale);
    # a group left out weighs 1, 0 drops it (the AugSelf paper predicts crop and color only)
    group_weights: dict[str, float] = field(default_factory=dict)
    # hssl: positives are two fibers (pooled `window` x `window` patch windows) of one image's
    # token grid; `displacement` caps their offset (None: any two positions); structure=false
    # is the ablation that mixes the fibers by a fixed random map.
    window: int = 2
    displacement: int | None = None
    structure: bool = True
    # with model.condition.source text: the prompt the images of this objective's source are
    # conditioned on, e.g. "a photo of a digit" (see mmssl/train/text_condition.py)
    condition_prompt: str | None = None


@dataclass
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # the AdamW implementation (same maths): "deepspeed" (DeepSpeed's FusedAdam; its CPUAdam
    # under ZeRO offload) or torch.optim.AdamW as "torch" (torch's default: a per-tensor loop
    # on CPU), "foreach" (multi-tensor ops) or "fused" (one fused kernel)
    impl: Literal["deepspeed", "torch", "foreach", "fused"] = "deepspeed"
    # decay the token and position tables too, as nanoGPT and OpenCLIP do (every tensor of
    # 2 or more dimensions); false leaves them undecayed, as timm does.  Norms, biases, the
    # class token and the logit scale/bias are never decayed (`engine.param_groups`)
    decay_embeddings: bool = False
    # layer-wise lr decay d (BEiT/MAE fine-tuning, timm's --layer-decay; mmssl.train.layer_decay):
    # block i of L at lr * d^(L - i), embeddings at lr * d^(L + 1), the rest at lr; None: off
    layer_decay: float | None = None


@dataclass
class ScheduleConfig:
    """Linear warmup from 0, then cosine decay to `lr * min_lr_ratio` at `train.steps`
    (kind "constant": lr after the warmup, no min_lr_ratio)."""

    kind: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps of the whole run (the schedule's length)
    global_batch_size: int = 32
    micro_batch_size: int = 32  # per rank per forward
    grad_clip: float | None = 1.0
    seed: int = 0
    deepspeed: str = "zero0"  # a JSON path, or the name of one in recipes/deepspeed/
    activation_checkpointing: bool = False
    # torch.compile every Block (mmssl.nn.compile); a failed compilation warns once and the
    # run continues eagerly
    compile: bool = False
    # the attention kernel of every Block (mmssl.nn.attention): "auto" takes matmul + softmax +
    # matmul on CPU in bf16 for short sequences (faster there than SDPA's fused kernel), else
    # SDPA
    attention: Literal["auto", "sdpa", "matmul"] = "auto"
    # on the CPU, glibc keeps freed blocks in the heap so each step reuses the last one's
    # memory instead of page-faulting fresh pages in (mmssl.train.host_memory); resident
    # memory then stays at the step's peak
    keep_host_memory: bool = True
    # stop (with a checkpoint) after this step, keeping the schedule of `steps`: for jobs cut
    # into time slices and for resume tests; None runs to the end
    stop_at: int | None = None
    # a step with a non-finite loss or gradient is skipped (no update) and counted; this many
    # in a row stop the run, keeping the last good checkpoint
    max_bad_steps: int = 10
    # an exported model whose weights start the run (mmssl.train.init_from); None: random
    init_from: str | None = None
    # parameter name prefixes not trained (mmssl.train.freeze): [visual] with init_from is
    # LiT (open_clip's --lock-image), [visual.patch_embed] MoCo v3's random patch projection
    freeze: list[str] = field(default_factory=list)


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between saves; 0: only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto: latest checkpoint of the run directory; none; or a path
    sigterm_check_every: int = 10  # SIGTERM: save and exit 143 (train.preempt); 0: no handler


@dataclass
class LoggingConfig:
    every: int = 10  # steps between metric reads (host syncs: see mmssl.train.loop)
    tensorboard: bool = True
    progress: bool = True  # tqdm bar on rank 0
    keys: bool = False  # every step's sample keys to keys/rank<R>.jsonl (audits, resume tests)


@dataclass
class EvalConfig:
    """Held-out loss every `every` steps (0: off) on `batches` batches per rank.

    sources maps each training source to the held-out source that replaces it (e.g.
    {train: test}); the task's objectives run unchanged on those batches.
    """

    every: int = 0
    sources: dict[str, str] = field(default_factory=dict)
    batches: int = 2


@dataclass
class Recipe:
    name: str = "run"
    out_dir: str = "runs"  # the run directory is out_dir/name
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: dict[str, ObjectiveConfig] = field(
        default_factory=lambda: {"clip": ObjectiveConfig()}
    )
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: Literal["fp32", "bf16"] = "fp32"
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # set by load_recipe: the directory of the YAML file, for relative paths in it
    base_dir: str = "."

    @property
    def run_dir(self) -> Path:
        """out_dir / name: where the run writes everything."""
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain nested data (what recipe.yaml holds)."""
        return to_dict(self)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A recipe file as a dict, with one-line errors for missing or malformed files."""
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory, not a recipe file" if p.is_dir() else "does not exist"
        raise ConfigError(f"recipe {str(p)!r} {what}")
    try:
        data = load_yaml(p.read_text(encoding="utf-8")) or {}
    except ConfigError as err:
        raise ConfigError(f"recipe {str(p)!r}: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {str(p)!r}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None)
        why = f" ({problem})" if problem else ""
        raise ConfigError(f"recipe {str(p)!r}{where}: not valid YAML{why}") from None
    if not isinstance(data, dict) or not data:  # empty: every default, a toy run on synthetic data
        raise ConfigError(f"recipe {str(p)!r}: expected a mapping of settings at the top level")
    return data


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """YAML file + `a.b=value` overrides -> a Recipe (schema-checked, not yet `validate`d)."""
    # keep_text: a str field takes an override's text (`name=42`, `name=no`); a number or
    # boolean in the YAML file itself is YAML's, and refused there (quote it)
    data = apply_overrides(read_yaml(path), overrides, keep_text=True, schema=Recipe)
    data.setdefault("base_dir", str(Path(path).expanduser().resolve().parent))
    return recipe_from_dict(data)


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """A Recipe from nested dicts, every key and type checked (ConfigError); an objective's type
    defaults to its key and must be one of OBJECTIVE_TYPES."""
    recipe = from_dict(Recipe, data, "")
    # paths as `~/x` (YAML and overrides pass them as text): out_dir made a folder named "~"
    paths = [(recipe, "out_dir"), (recipe.checkpoint, "resume"), (recipe.train, "deepspeed")]
    for part, key in [*paths, (recipe.model, "name"), (recipe.data, "tokenizer")]:
        setattr(part, key, os.path.expanduser(getattr(part, key)))
    if recipe.train.init_from is not None:
        recipe.train.init_from = os.path.expanduser(recipe.train.init_from)
    for key, obj in recipe.objectives.items():
        obj.type = obj.type or key
        if obj.type not in OBJECTIVE_TYPES:
            from mmssl.schema import suggest

            raise ConfigError(
                f"objectives.{key}.type: unknown objective {obj.type!r}"
                f"{suggest(obj.type, OBJECTIVE_TYPES)}; one of {list(OBJECTIVE_TYPES)}"
            )
    return recipe


def resolve_path(recipe: Recipe, path: str) -> Path:
    """A path from the recipe: absolute, relative to the cwd, or relative to the recipe file."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return Path(recipe.base_dir) / p


# the model's config names its keys `model.<key>`, bare or quoted; the recipe spells them
# `model.overrides.<key>`
_OVERRIDE_KEY = re.compile(r"(^|')model\.(?!overrides\.)")


def override_error(err: ConfigError) -> ConfigError:
    """A model config's error about `model.<key>` as the recipe's `model.overrides.<key>`."""
    return ConfigError(_OVERRIDE_KEY.sub(r"\1model.overrides.", str(err), count=1))


def model_config(recipe: Recipe) -> Any:
    """The resolved ModelConfig, with activation checkpointing switched on in every tower."""
    from mmssl.models.registry import ModelFileError, resolve_model_config

    try:
        cfg = resolve_model_config(recipe.model.name, **recipe.model.overrides)
    except ModelFileError as err:  # a key of the file model.name names, not of the overrides
        raise ConfigError(f"model.name: {err}") from None
    except ConfigError as err:
        raise override_error(err) from None
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"model: {err}") from None
    from mmssl.train.dry_build import dry_build

    dry_build(cfg)
    if recipe.train.activation_checkpointing:
        for tower in (cfg.vision, cfg.text):
            if tower is not None:
                tower.grad_checkpointing = True
    return cfg


def world_size_from_env() -> int:
    """The world size the launcher announced (1 without a launcher)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:  # 0 divided the batch by zero (a traceback)
        raise ConfigError(f"WORLD_SIZE must be an integer >= 1, got {value!r}")
    return size


def grad_accum_steps(recipe: Recipe, world_size: int) -> int:
    """global_batch_size / (world_size x micro_batch_size), or a ConfigError naming the numbers."""
    t = recipe.train
    if t.micro_batch_size <= 0 or t.global_batch_size <= 0:
        raise ConfigError("train.micro_batch_size and train.global_batch_size must be positive")
    per_step = world_size * t.micro_batch_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size {t.global_batch_size} is not divisible by world size "
            f"{world_size} x train.micro_batch_size {t.micro_batch_size} = {per_step}"
        )
    return t.global_batch_size // per_step


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML, keys in field order."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def check_ranges(recipe: Recipe) -> None:
    """ConfigError for a name, step count, schedule or other number out of its range (the
    checks of `validate` that need neither the model nor the files; `mmssl plan` runs them)."""
    parts = PurePath(recipe.name.strip()).parts
    if not parts or PurePath(recipe.name).is_absolute() or {".", ".."} & set(parts):
        # `name=$RUN` with RUN unset: the run would write into out_dir itself; `../x` or
        # `/x`: beside or far from out_dir, perhaps into another run's directory
        raise ConfigError(f"name must name the run directory under out_dir, got {recipe.name!r}")
    t, s = recipe.train, recipe.schedule
    if t.steps <= 0:
        raise ConfigError(f"train.steps must be positive, got {t.steps}")
    if t.stop_at is not None and not 0 < t.stop_at <= t.steps:
        raise ConfigError(f"train.stop_at must be in 1..train.steps ({t.steps}), got {t.stop_at}")
    if t.max_bad_steps < 1:
        raise ConfigError(f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    if not 0 <= s.warmup_steps <= t.steps:
        raise ConfigError(
            f"schedule.warmup_steps must be in 0..train.steps ({t.steps}), got "
            f"{s.warmup_steps}: a shorter run needs a shorter warmup, e.g. "
            f"schedule.warmup_steps={max(0, min(s.warmup_steps, t.steps // 10))}"
        )
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        raise ConfigError(f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
    if s.kind == "constant" and s.min_lr_ratio:  # the constant schedule never reads it
        raise ConfigError(
            f"schedule.min_lr_ratio={s.min_lr_ratio} has no effect with schedule.kind=constant; "
            "use kind=cosine to decay, or remove it"
        )
    if len(recipe.optim.betas) != 2:
        raise ConfigError(f"optim.betas needs 2 numbers, got {recipe.optim.betas}")
    c = recipe.checkpoint
    if c.every < 0 or c.keep_last < 1 or c.sigterm_check_every < 0:
        raise ConfigError("checkpoint.every, .sigterm_check_every >= 0 and .keep_last >= 1")
    if recipe.logging.every < 1:
        raise ConfigError(f"logging.every must be >= 1, got {recipe.logging.every}")
    if recipe.data.views not in (0, 2):
        raise ConfigError(
            f"data.views must be 0 or 2, got {recipe.data.views}: simclr and augself use "
            f"exactly two views and the other objectives the first, so more would be rendered "
            f"and never used"
        )
    if recipe.data.view_augment and len(recipe.data.view_augment) != recipe.data.views:
        raise ConfigError(
            f"data.view_augment has {len(recipe.data.view_augment)} entries; "
            f"data.views is {recipe.data.views}"
        )
    if recipe.data.workers < 0:
        raise ConfigError(f"data.workers must be >= 0, got {recipe.data.workers}")
    if recipe.data.max_pixels < 1:
        raise ConfigError(f"data.max_pixels must be >= 1, got {recipe.data.max_pixels}")


def _check_numba(data: DataConfig) -> None:
    """backend numba needs the compiled renderer to load (numba installed, a writable cache,
    no NUMBA_DISABLE_JIT): said before the run starts, not at its first batch.  Each view
    renders with `data.augment` updated by its `data.view_augment` entry."""
    from mmssl.data.decode import compiled_problem

    asking = []  # the keys that set backend numba for a view that is rendered
    for i, view in enumerate(data.view_augment or [{}] * bool(data.views)):
        if {**data.augment, **view}.get("backend") == "numba":
            asking.append(
                f"data.view_augment[{i}].backend" if "backend" in view else "data.augment.backend"
            )
    if not asking:
        return
    problem = compiled_problem("fastviews") or compiled_problem("fastdraws")
    if problem:
        raise ConfigError(
            f"{asking[0]}: backend numba, but {problem}; or use backend auto (torch renders then)"
        )


@dataclass
class Resolved:
    """What `validate` derived: the model config, accumulation steps, the DeepSpeed config."""

    model: Any
    world_size: int
    grad_accum: int
    ds_config: dict[str, Any]


def check_recipe(recipe: Recipe) -> Any:
    """The checks of `validate` that need neither a world size nor the file system (`mmssl
    plan` runs them too): ranges, values, the model (built on meta; returned), the
    objectives against it, eval sources.  ConfigError on the first problem."""
    from mmssl.train.freeze import check_freeze
    from mmssl.train.init_from import warn_if_export
    from mmssl.train.objective_checks import check_eval, check_objectives
    from mmssl.train.text_condition import check_condition
    from mmssl.train.values import check_values

    check_ranges(recipe)
    check_values(recipe)
    cfg = model_config(recipe)
    warn_if_export(recipe)
    check_condition(recipe, cfg)  # condition_prompt against model.condition.source
    check_objectives(recipe, cfg)
    check_eval(recipe)
    check_freeze(recipe.train.freeze, cfg)
    return cfg


def validate(recipe: Recipe, world_size: int | None = None, check_files: bool = True) -> Resolved:
    """Check everything that can be checked without a process group; raise ConfigError.

    check_files=False skips the checks of the file system, that the shards exist and that
    the run directory can be made (recipes for other machines); the shard counts of
    epoch-mode sources are checked for `world_size` ranks either way."""
    from mmssl.train.ds_config import deepspeed_config
    from mmssl.train.init_from import check_init
    from mmssl.train.streams import check_data

    world = world_size_from_env() if world_size is None else world_size
    cfg = check_recipe(recipe)
    accum = grad_accum_steps(recipe, world)
    ds = deepspeed_config(recipe, accum)
    from mmssl.train import file_checks

    if check_files:  # this machine: its files, and numba if the views ask for it
        file_checks.check_run_dir(recipe)
        file_checks.check_shards(recipe)
        file_checks.check_resume(recipe)
        check_init(recipe, cfg)
        _check_numba(recipe.data)
    file_checks.check_shard_counts(recipe, world)
    check_data(recipe, cfg, world)
    return Resolved(model=cfg, world_size=world, grad_accum=accum, ds_config=ds)
