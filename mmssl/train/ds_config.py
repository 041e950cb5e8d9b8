"""The DeepSpeed JSON of a recipe: found (`find_deepspeed_json`), checked and completed
(`deepspeed_config`).

The JSON holds engine knobs only (ZeRO stage, offload, bucket sizes).  Everything that
changes the maths comes from the recipe and is injected here; a JSON that sets one of those
keys to another value is a ConfigError naming the key, as are keys close to DeepSpeed's own
names, sections placed where DeepSpeed ignores them, and combinations it cannot run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmssl.schema import ConfigError, read_json_config
from mmssl.shipped import shipped_path

if TYPE_CHECKING:
    from mmssl.train.recipe import Recipe

# keys a recipe owns; the JSON may repeat them only with the same value
RECIPE_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
    "bf16",
    "bfloat16",  # DeepSpeed's older name of bf16: compared with the bf16 the recipe sets
    "fp16",
    "amp",
    "torch_autocast",  # the recipe's `precision` decides the dtypes
)
SHIPPED_DS = shipped_path("recipes", "deepspeed")
# optim.impl -> extra DeepSpeed optimizer params: `torch_adam` makes DeepSpeed build
# torch.optim.AdamW, which receives the params DeepSpeed does not consume (`fused`) as keywords
OPTIM_IMPL_PARAMS: dict[str, dict[str, Any]] = {
    "deepspeed": {},
    "torch": {"torch_adam": True},
    "foreach": {"torch_adam": True, "foreach": True},
    "fused": {"torch_adam": True, "fused": True},
}


def find_deepspeed_json(recipe: Recipe) -> Path:
    """train.deepspeed as a path (cwd, then next to the recipe) or a shipped name (zero2)."""
    value = recipe.train.deepspeed
    base = Path(recipe.base_dir)
    candidates = [Path(value), base / value]
    if not value.endswith(".json"):
        candidates += [base / "deepspeed" / f"{value}.json", SHIPPED_DS / f"{value}.json"]
    for path in candidates:
        if path.is_file():
            return path
    named = " (shipped ones are named without .json)" if (SHIPPED_DS / value).is_file() else ""
    looked = ", ".join(map(str, candidates))
    raise ConfigError(f"train.deepspeed: no DeepSpeed JSON {value!r}{named} (looked for {looked})")


def _injected(recipe: Recipe, grad_accum: int) -> dict[str, Any]:
    t, o = recipe.train, recipe.optim
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(t.grad_clip or 0.0),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                **OPTIM_IMPL_PARAMS[o.impl],
            },
        },
        "bf16": {"enabled": recipe.precision == "bf16"},
        "fp16": {"enabled": False},
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) <= set(b) and all(_same(v, b[k]) for k, v in a.items())
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


# DeepSpeed config sections whose names its config modules do not hold as constants
DS_SECTIONS = (
    "activation_checkpointing",
    "aio",
    "amp",
    "autotuning",
    "comms_logger",
    "compile",
    "compression_training",
    "csv_monitor",
    "elasticity",
    "flops_profiler",
    "hybrid_engine",
    "nebula",
    "tensorboard",
    "tensor_parallel",
    "wandb",
    "weight_quantization",
)


def _check_ds_keys(path: Path, data: dict[str, Any]) -> None:
    """DeepSpeed ignores top-level keys it does not know, so a typo (`zero_optimisation`)
    would train silently at ZeRO-0: a key close to one of DeepSpeed's own names is an error.
    (DeepSpeed's names are spread over many modules; the constants of its config modules
    plus DS_SECTIONS miss a few real ones, so an unknown key unlike any of them is let through.)  `zero_optimization` is
    checked whole against DeepSpeed's own model of it, before the engine would."""
    import difflib

    import deepspeed.runtime.config as ds_config
    import deepspeed.runtime.zero.config as zero_config

    known = {
        v
        for module in (ds_config, zero_config)
        for k, v in vars(module).items()
        if k.isupper() and isinstance(v, str)
    } | set(DS_SECTIONS)
    for key in data:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.85)
        if key not in known and close:
            raise ConfigError(f"{path}: unknown key {key!r} (did you mean {close[0]!r}?)")
    zero = data.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{path}: zero_optimization must be an object, got {zero!r}")
    # sections DeepSpeed has removed (elasticity, sparse_attention, ...) passed --validate and
    # failed at deepspeed.initialize with a traceback; its own check, where it has one
    reject_removed = getattr(ds_config, "_reject_removed_config_keys", None)
    if reject_removed is not None:
        try:
            reject_removed(data)
        except ds_config.DeepSpeedConfigError as err:
            raise ConfigError(f"{path}: {str(err).strip()}") from None
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(
            f"{path}: zero_optimization.{where}: {first['msg']} (got {first.get('input')!r})"
        ) from None


# sections that, enabled, write files where they are told (anywhere, over any file) or send
# the run to a service: a DeepSpeed JSON holds engine knobs (DESIGN), mmssl logs to RUN_DIR
DS_OUTSIDE = ("autotuning", "comet", "csv_monitor", "nebula", "tensorboard", "wandb")


def _check_ds_outside(path: Path, data: dict[str, Any]) -> None:
    """ConfigError for an enabled section of DS_OUTSIDE, or a flops profiler's output_file."""
    for key in DS_OUTSIDE:
        section = data.get(key)
        if isinstance(section, dict) and section.get("enabled"):
            raise ConfigError(
                f"{path}: {key!r} is enabled: DeepSpeed's monitors write outside the run "
                "directory (or to a service); remove it (mmssl logs to RUN_DIR: "
                "metrics.jsonl, logging.tensorboard)"
            )
    profiler = data.get("flops_profiler")
    if isinstance(profiler, dict) and profiler.get("output_file"):
        raise ConfigError(
            f"{path}: flops_profiler.output_file writes outside the run directory; remove "
            "it (the profile is then printed)"
        )


def deepspeed_config(recipe: Recipe, grad_accum: int) -> dict[str, Any]:
    """The engine JSON of the recipe with batch sizes, precision, clipping and optimizer injected."""
    path = find_deepspeed_json(recipe)
    data = read_json_config(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    _check_ds_keys(path, data)
    _check_ds_outside(path, data)
    injected = _injected(recipe, grad_accum)
    for key in RECIPE_KEYS:
        if key not in data:
            continue
        ours = injected.get("bf16" if key == "bfloat16" else key)
        if key in ("scheduler", "amp", "torch_autocast") or not _same(data[key], ours):
            raise ConfigError(
                f"{path}: {key!r} conflicts with the recipe ({json.dumps(data[key])} vs "
                f"{json.dumps(ours)}); remove it, the recipe sets it"
            )
    _check_comm_dtype(path, data, recipe.precision)
    out = {"steps_per_print": 10**9, "wall_clock_breakdown": False, **data, **injected}
    stage = out.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0..3, got {stage!r}")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = DeepSpeedZeroConfig(**out.get("zero_optimization", {}))  # with its older names
    devices = {}
    for key, least in (("offload_optimizer", 1), ("offload_param", 3)):
        # DeepSpeed ignores an offload below the stage that implements it
        device = getattr(getattr(zero, key), "device", "none")
        devices[key] = str(getattr(device, "value", device))
        if devices[key] != "none" and stage < least:
            raise ConfigError(
                f"{path}: zero_optimization.{key} needs stage {least} or above (got stage "
                f"{stage}), where DeepSpeed would train without it; raise the stage or remove it"
            )
    bf16 = recipe.precision == "bf16"
    # DeepSpeed's choice of optimizer counts a cpu offload only (`zero_cpu_offload`)
    _check_accum_dtype(path, out, stage, bf16, devices["offload_optimizer"] == "cpu")
    return out


def _check_comm_dtype(path: Path, data: dict[str, Any], precision: str) -> None:
    """A communication dtype below the recipe's precision is a ConfigError: DeepSpeed casts
    the gradients to it for the all-reduce (fp16 in an fp32 run changed the weights on one
    rank, and can overflow past 65504 summed over many); fp32, or the weights' own bf16, runs."""
    allowed = {"fp32", "bf16"} if precision == "bf16" else {"fp32"}
    for key in ("communication_data_type", "seq_parallel_communication_data_type"):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or value.lower() not in allowed):
            raise ConfigError(
                f"{path}: {key}={json.dumps(value)} with {precision} training: gradients would "
                f"be reduced in another precision than the recipe's; remove it (or use "
                f"{' or '.join(sorted(allowed))})"
            )


def _check_accum_dtype(
    path: Path, config: dict[str, Any], stage: int, bf16: bool, offload: bool
) -> None:
    """`data_types.grad_accum_dtype` (fp32, bf16 or fp16) where DeepSpeed cannot run it: at
    stage 0 any dtype other than the weights' ("unsupported mix" at start-up); at stage 1,
    fp32 with bf16 weights and no optimizer offload, where DeepSpeed swaps in its
    BF16_Optimizer, whose checkpoints zero_to_fp32, and so `mmssl export`, cannot read (a run
    trained to its end and its weights could not be exported)."""
    from deepspeed.runtime.config import DtypeEnum

    types = config.get("data_types")
    if types is None:
        return
    if not isinstance(types, dict):
        raise ConfigError(f"{path}: data_types must be an object, got {json.dumps(types)}")
    value = types.get("grad_accum_dtype")
    if value is None:
        return
    try:
        accum = DtypeEnum(value).value
    except ValueError:
        accum = None
    if accum not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(
            f"{path}: data_types.grad_accum_dtype must be fp32, bf16 or fp16, got {value!r}"
        )
    model = torch.bfloat16 if bf16 else torch.float32
    if stage == 0 and accum != model:
        why = "DeepSpeed cannot start so"
    elif stage == 1 and bf16 and accum == torch.float32 and not offload:
        why = "DeepSpeed then uses its BF16_Optimizer, whose checkpoints mmssl export cannot read"
    else:
        return
    raise ConfigError(
        f"{path}: data_types.grad_accum_dtype={value} with {model} weights at ZeRO stage "
        f"{stage}: {why}; remove it or use ZeRO stage 2 or 3"
    )
