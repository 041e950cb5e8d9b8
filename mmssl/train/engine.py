"""The DeepSpeed engine: process-group start, parameter groups, LR schedule, initialize (the
DeepSpeed JSON a recipe names, with the recipe's values injected: `mmssl.train.ds_config`).
"""

from __future__ import annotations

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

if TYPE_CHECKING:
    from mmssl.train.recipe import Recipe

# parameters without weight decay besides every tensor with ndim < 2 (norms, biases,
# logit scale and bias): the class token, and unless optim.decay_embeddings the token and
# position tables
NO_DECAY_NAMES = ("cls_token",)
TABLE_NAMES = ("token_embed", "pos_embed")


def param_groups(
    module: nn.Module,
    weight_decay: float,
    decay_embeddings: bool = False,
    lr: float | None = None,
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups: decayed matrices, and the rest (norms, biases, class token, logit
    scale/bias, and the token and position tables unless `decay_embeddings`) without weight
    decay.  Shared parameters once (a tied LM head as its token table).  With `layer_decay`
    (`mmssl.train.layer_decay`) each of those splits by lr multiplier, each group's "lr" set
    to `lr` times it, the full-lr groups first (the logged lr is the first group's)."""
    skip = NO_DECAY_NAMES if decay_embeddings else NO_DECAY_NAMES + TABLE_NAMES
    scales: dict[str, float] = {}
    if layer_decay is not None:
        from mmssl.train.layer_decay import layer_scales

        scales = layer_scales(module, layer_decay)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        decayed = not (p.ndim < 2 or any(k in name.split(".") for k in skip))
        groups.setdefault((scales.get(name, 1.0), decayed), []).append(p)
    out = []
    for scale, decayed in sorted(groups, key=lambda k: (-k[0], not k[1])):
        group = {"params": groups[scale, decayed], "weight_decay": weight_decay if decayed else 0.0}
        if layer_decay is not None:
            assert lr is not None, "layer_decay sets each group's lr from `lr`"
            group["lr"] = lr * scale
        out.append(group)
    if not any(decayed for _, decayed in groups):  # the decayed group, even empty, comes first
        out.insert(0, {"params": [], "weight_decay": weight_decay})
    return out


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
        model_parameters=param_groups(
            task,
            recipe.optim.weight_decay,
            recipe.optim.decay_embeddings,
            recipe.optim.lr,
            recipe.optim.layer_decay,
        ),
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
