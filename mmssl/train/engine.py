"""The DeepSpeed engine: config injection, process-group start, parameter groups, LR schedule.

The DeepSpeed JSON of a recipe holds engine knobs only (ZeRO stage, offload, bucket sizes).
Everything that changes the maths comes from the recipe and is injected here; a JSON that
sets one of those keys to another value is a ConfigError naming the key.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmssl import distributed
from mmssl.nn.attention import set_attention_kernel
from mmssl.schema import ConfigError
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
# parameters without weight decay besides every tensor with ndim < 2 (norms, biases,
# logit scale and bias): embedding tables, position tables and the class token
NO_DECAY_NAMES = ("token_embed", "pos_embed", "cls_token")
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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
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
    out = {"steps_per_print": 10**9, "wall_clock_breakdown": False, **data, **injected}
    stage = out.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0..3, got {stage!r}")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = DeepSpeedZeroConfig(**out.get("zero_optimization", {}))  # with its older names
    for key, least in (("offload_optimizer", 1), ("offload_param", 3)):
        # DeepSpeed ignores an offload below the stage that implements it
        section = getattr(zero, key)
        device = getattr(section, "device", "none")
        if str(getattr(device, "value", device)) != "none" and stage < least:
            raise ConfigError(
                f"{path}: zero_optimization.{key} needs stage {least} or above (got stage "
                f"{stage}), where DeepSpeed would train without it; raise the stage or remove it"
            )
    return out


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed matrices, and the rest (norms, biases, embeddings, position
    tables, class token, logit scale/bias) without weight decay.  Shared parameters once."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(k in name.split(".") for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def fp32_master_names(engine: Any) -> list[list[str]] | None:
    """The parameter names of each group of DeepSpeed's stage-0 bf16/fp16 optimizer, in its
    order.  Its state dict saves the fp32 master weights without names: FP16_UnfusedOptimizer
    (a torch optimizer: optim.impl torch, foreach, fused) as `fp32_groups`, lists of tensors;
    FP16_Optimizer (DeepSpeed's FusedAdam: optim.impl deepspeed) as `fp32_groups_flat`, one
    flat tensor per group, the parameters concatenated in this order.  `mmssl export` maps
    them back with these names.  None for other optimizers (ZeRO 1-3 checkpoints name their
    masters themselves)."""
    opt = engine.optimizer
    groups = getattr(opt, "fp16_groups", None)
    masters = getattr(opt, "fp32_groups", None)
    if masters is None:
        masters = getattr(opt, "fp32_groups_flat", None)
    if not isinstance(masters, list) or not groups:
        return None
    name_of = {id(p): n for n, p in engine.module.named_parameters()}
    if not all(isinstance(g, list) and all(id(p) in name_of for p in g) for g in groups):
        return None
    return [[name_of[id(p)] for p in g] for g in groups]


class WarmupCosine:
    """LR multiplier after `step` optimizer steps: linear warmup to 1 over `warmup` steps, then
    cosine to `min_ratio` at `total` (constant 1 after warmup when `cosine` is False)."""

    def __init__(self, warmup: int, total: int, min_ratio: float, cosine: bool = True) -> None:
        self.warmup, self.total, self.min_ratio, self.cosine = warmup, total, min_ratio, cosine

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if not self.cosine:
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_schedule(recipe: Recipe) -> WarmupCosine:
    """The recipe's LR multiplier per optimizer step (see WarmupCosine)."""
    s = recipe.schedule
    return WarmupCosine(s.warmup_steps, recipe.train.steps, s.min_lr_ratio, s.kind == "cosine")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _complete_launch_env() -> None:
    """A launcher's environment given in part (RANK set by hand, say): DeepSpeed takes all of
    `LAUNCH_ENV` or tries MPI discovery, which failed on a missing mpi4py.  A one-process
    group gets the rest filled in as a bare `python -m mmssl.train` does; a larger one
    cannot be guessed (which rank shares a node with which), so the missing names are said."""
    missing = [k for k in LAUNCH_ENV if k not in os.environ]
    if not missing:
        return
    if os.environ.get("WORLD_SIZE", "1") == "1" and os.environ["RANK"] == "0":
        defaults = {"WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
        for key in missing:
            os.environ[key] = defaults.get(key) or str(_free_port())
        return
    raise RuntimeError(
        f"RANK is set but {', '.join(missing)} not: set all of {', '.join(LAUNCH_ENV)} (as "
        "torchrun and the deepspeed launcher do), or none for a one-process run"
    )


def env_ninja_first() -> None:
    """Put the `ninja` installed beside this Python (DeepSpeed's dependency) first on PATH.

    DeepSpeed builds its CPU ops (shared-memory all-reduce, Adam) with torch's JIT into one
    cache per user, and ninja runs that build.  A shell with the venv activated found the
    venv's ninja (1.13, build log v7), one without it the system's (1.11, log v5); each
    discarded the other's log and rebuilt every op, 1-2 minutes a launch."""
    here = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(here, "ninja")):
        return
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != here:
        os.environ["PATH"] = here + (os.pathsep + path if path else "")


def init_distributed() -> None:
    """Start the process group through DeepSpeed, with the accelerator's backend (gloo on CPU).

    Without a launcher (`python -m mmssl.train`) the environment of a one-process group is
    set here; otherwise DeepSpeed would try MPI discovery and fail.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    env_ninja_first()
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    elif "RANK" in os.environ and not distributed.is_initialized():
        _complete_launch_env()  # a group a caller started is adopted as it is
    # idempotent; adopts a process group that a caller (a test harness) already started
    try:
        deepspeed.init_distributed(
            dist_backend=get_accelerator().communication_backend_name(), verbose=False
        )
    except (RuntimeError, subprocess.CalledProcessError) as err:  # the first time on a CPU,
        if isinstance(err, RuntimeError) and "building extension" not in str(err):
            raise  # DeepSpeed compiles its shared-memory op
        raise ConfigError(
            "DeepSpeed could not build its CPU communication op (deepspeed_shm_comm): it needs "
            f"a working C++ compiler (c++ or $CXX; e.g. apt install g++) the first time ({err})"
        ) from None
    if get_accelerator().device_name() == "cpu":
        _unlink_shm_workspace()
    else:
        # each rank's own device from the start, as deepspeed.initialize would set it
        # later: `device()` and the collectives before the engine exists (the run
        # directory's lock) would otherwise use device 0 on every rank of a node
        get_accelerator().set_device(distributed.local_rank())


def _unlink_shm_workspace() -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce workspace from /dev/shm.

    When every rank runs on this machine (the `deepspeed` launcher sets LOCAL_SIZE to the
    world size), DeepSpeed's CPU backend creates a 69 MB shared-memory file per rank,
    `deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}`, maps every
    rank's file, and never unlinks them: each run left them in /dev/shm (memory) until
    reboot.  After the barrier every rank has mapped every file, so the names can go; the
    mappings stay valid until the processes exit, and nothing is left behind even after
    a crash.
    """
    world = distributed.world_size()
    if os.environ.get("LOCAL_SIZE") != str(world):
        return
    distributed.barrier()
    env = os.environ
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
        f"{env.get('MASTER_PORT', '')}_{distributed.rank()}"
    )
    Path("/dev/shm", name).unlink(missing_ok=True)


def device() -> torch.device:
    """This rank's accelerator device (DeepSpeed's current one), or the CPU."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name == "cpu":
        return torch.device("cpu")
    return torch.device(name, get_accelerator().current_device())


def initialize(task: nn.Module, recipe: Recipe, ds_config: dict[str, Any]) -> Any:
    """deepspeed.initialize of `task` with our parameter groups and schedule -> the engine."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    schedule = lr_schedule(recipe)
    set_attention_kernel(task, recipe.train.attention)
    if recipe.train.compile:
        from mmssl.nn.compile import compile_blocks

        compile_blocks(task)
    engine, _, _, _ = deepspeed.initialize(
        model=task,
        model_parameters=param_groups(task, recipe.optim.weight_decay),
        config=ds_config,
        lr_scheduler=lambda opt: LambdaLR(opt, schedule),
        dist_init_required=False,
    )
    if zero_stage(ds_config) == 3:
        alias_zero3_fp32_partitions(engine.optimizer)
    undo_state_init(engine.optimizer)
    return engine


def undo_state_init(optimizer: Any) -> bool:
    """Undo the optimizer step DeepSpeed's stage-0 fp16/bf16 wrappers (FP16_UnfusedOptimizer,
    FP16_Optimizer) take on zero gradients when built (`initialize_optimizer_states`): AdamW
    counted it, so the first real update used step 2's bias correction (0.744 of fp32's and of
    ZeRO 1-3's: another loss curve), and it shrank the fp32 master weights by one weight decay
    at the full lr.  The inner state goes (AdamW makes it again at the first step, as torch's
    does) and the masters are copied back from the model's weights they were made from.  A
    resume loads its own state afterwards.  True when there was such a wrapper."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        return False  # ZeRO 1-3's build their state without a step
    inner = optimizer.optimizer
    inner.state.clear()
    with torch.no_grad():
        if getattr(optimizer, "fp32_groups", None) is not None:  # unfused: a master per param
            for low, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups):
                for p, m in zip(low, masters):
                    m.copy_(p.float())
        else:  # fused: one flat master per group, a copy of the flat low-precision group
            for low, master in zip(optimizer.fp16_groups_flat, optimizer.fp32_groups_flat):
                master.copy_(low.float())
    return True


def alias_zero3_fp32_partitions(optimizer: Any) -> int:
    """Keep one copy of the fp32 parameter partitions under fp32 ZeRO-3, not two.

    DeepSpeed means its fp32 master partition to alias the parameter partition when both are
    fp32 on the same device, but it compares a torch.device with a device-name string (never
    equal) and clones them: 4 bytes per parameter / ranks more on every rank.  Each clone still
    equal to its partition becomes a view of it (the optimizer keeps the tensor object, so its
    state keys hold); DeepSpeed's copy from master to partition after a step becomes a no-op.
    Returns how many partitions now share their storage.
    """
    low = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    master = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    offload = getattr(optimizer, "offload_optimizer", True) or getattr(
        optimizer, "offload_param", True
    )
    if not low or not master or offload:
        return 0
    count = 0
    for lp, hp in zip(low, master):
        if (
            lp is not None
            and lp.dtype == hp.dtype
            and lp.device == hp.device
            and lp.shape == hp.shape
            and lp.untyped_storage().data_ptr() != hp.untyped_storage().data_ptr()
            and torch.equal(lp, hp)
        ):
            hp.data = lp.data
            count += 1
    return count


def zero_stage(ds_config: dict[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed config (0 without zero_optimization)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
