"""`mmssl plan RECIPE --gpus N [--gpu-mem GB --tflops T --mfu M --bandwidth GBps]`: the
parameter count, FLOPs per sample, memory per rank and step time of a recipe on a cluster.

Memory per rank follows the ZeRO paper (Rajbhandari et al. 2020, section 3): with Psi
parameters, mixed-precision Adam keeps 2 Psi bytes of bf16 parameters, 2 Psi of bf16
gradients and K Psi of optimizer states (K = 12: fp32 master weights, momentum, variance);
fp32 training keeps 4 Psi + 4 Psi + 8 Psi, except under ZeRO 1 and 2, whose optimizer
clones its fp32 partition as a separate master copy (K = 12 there too; the engine aliases
that copy only under ZeRO 3).  Stage 1 divides the optimizer states by N, stage 2 also the
gradients, stage 3 also the parameters.  CPU offload follows DeepSpeed's estimators
(`estimate_zero2/3_model_states_mem_needs`): `offload_optimizer` moves the optimizer states
and the gradient partitions to the host, `offload_param` (stage 3) the parameters.
Activations per layer and sample follow Korthikanti et al. 2022 with fused attention: 34 s h
bytes in 16-bit (the 5 a s^2 attention-matrix term is not stored by SDPA kernels);
activation checkpointing keeps 2 s h per layer plus one layer's full set.  An LM head keeps
its (N, V) logits either way: with `fused_head` one buffer in the compute dtype that its
gradient overwrites (`mmssl/nn/linear_ce.py`), else 16-bit logits, an fp32 copy and its
gradient (10 bytes per logit).  Training FLOPs are 3x the forward (the patch embedding's
2x: the images take no gradient; a tower `train.freeze` holds whole 1x), plus with
activation checkpointing the blocks' forward once more but the fc2 matmuls nothing saves
(`_unsaved_fc2`; the patch embedding and LM head are outside the blocks).  Step time is
compute at `tflops x mfu` per GPU on those FLOPs (recomputation included), overlapped with
the data-parallel traffic, per step with `a` accumulation steps: 2 Psi elements for stages 0-1
(one all-reduce), (a + 1) Psi for stage 2 (gradients reduce-scattered every micro-step, the
parameters gathered once) and 3 a Psi for stage 3 (parameters gathered in the forward and the
backward, gradients reduce-scattered, every micro-step).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from mmssl.cliargs import ArgumentParser, check_numbers, summary
from mmssl.schema import ConfigError

GB = 1e9


def _block_flops(n: int, dim: int, mlp_ratio: float) -> float:
    """Forward FLOPs (2 per multiply-add) of one Block on n tokens."""
    return 2 * n * dim * dim * (4 + 2 * mlp_ratio) + 4 * n * n * dim


def _unsaved_fc2(
    depth: int, n: int, dim: int, block: Any, cond_blocks: int, pooled_only: bool
) -> float:
    """Forward FLOPs of the fc2 matmuls (the MLP's output projection) that activation
    checkpointing does not rerun: torch's non-reentrant checkpoint stops at the last tensor
    the backward saved, and nothing saves fc2's output unless LayerScale, an adaLN gate (the
    top `cond_blocks` blocks) or DropPath (its mask drawn after fc2; rate > 0) follows it."""
    width = dim * block.mlp_ratio * (1 if block.mlp == "mlp" else 2 / 3)  # SwiGLU: 2/3
    total = 0.0
    for i in range(depth):
        rate = block.drop_path * i / max(depth - 1, 1)  # as `Transformer` spreads it
        if not (block.init_values or i >= depth - cond_blocks or rate > 0):
            total += 2 * (1 if pooled_only and i == depth - 1 else n) * dim * width
    return total


def _tower_flops(depth: int, n: int, dim: int, mlp_ratio: float, pooled_only: bool) -> float:
    """Forward FLOPs of `depth` Blocks on n tokens; pooled_only: the last computes one row
    (`Transformer` rows): qkv on every token, the rest on one."""
    if not pooled_only or depth == 0:
        return depth * _block_flops(n, dim, mlp_ratio)
    last = 2 * n * dim * 3 * dim + 2 * dim * dim * (1 + 2 * mlp_ratio) + 4 * n * dim
    return (depth - 1) * _block_flops(n, dim, mlp_ratio) + last


@dataclass
class Workload:
    """Per sample (one from every source the objectives read)."""

    flops: float  # forward
    training: float  # forward + backward, without recomputation
    recomputed: float  # by activation checkpointing, in the backward
    activation_bytes: float  # at 16 bits, without checkpointing
    checkpointed_bytes: float  # with activation checkpointing
    logits_bytes: float  # LM heads' (N, V) logits at the recipe's precision, either way


def _frozen(recipe: Any, cfg: Any, tower: str) -> bool:
    """`train.freeze` holds `tower` whole and nothing in it trains (no conditioning, no
    shared trunk): its forward runs without a backward or a recomputation.  Other freezes
    are counted as trained (a frozen layer inside a trained tower still passes gradients)."""
    return tower in recipe.train.freeze and not cfg.shared_trunk


def workload(recipe: Any, cfg: Any) -> Workload:
    """Forward and training FLOPs and activation bytes of one sample of every source, as the
    Task runs it (activations as if the pooled-only last blocks kept every row: a slight
    overestimate).  Training FLOPs are 3x the forward (the backward's two matmuls for each
    forward one), 2x for the patch embedding (the images take no gradient) and 1x for a
    whole frozen tower (`_frozen`), which also recomputes nothing."""
    from mmssl.train.recipe import NEEDS
    from mmssl.train.streams import source_sizes
    from mmssl.train.tasks import TOKEN_MEAN, VISION_TOKENS

    # the Task runs the vision tower pooled-only unless some objective reads its tokens
    vision_pooled = not any(o.type in VISION_TOKENS for o in recipe.objectives.values())

    flops = train = rerun = act = ckpt = logits = 0.0
    compute = 2 if recipe.precision == "bf16" else 4  # bytes of one logit in the compute dtype
    peak_layer = 0.0
    for name, src in recipe.data.sources.items():
        kinds = {o.type for o in recipe.objectives.values() if o.source == name}
        if not kinds:
            continue
        needs = set().union(*(NEEDS[k] for k in kinds))
        side, n_text = source_sizes(recipe, src, cfg)  # the image size and context it feeds
        if needs & {"image", "views"} and cfg.vision is not None:
            v = cfg.vision
            images = max(1, recipe.data.views) if "views" in needs or recipe.data.views else 1
            patches = (side // v.patch_size) ** 2  # data.image_size resamples the position table
            n = (1 if v.class_token else 0) + patches + v.cond_tokens  # conditioning prefix
            pooled_only = vision_pooled and v.pool == "token"
            embed = images * 2 * patches * v.in_chans * v.patch_size**2 * v.dim  # no class token
            blocks = images * _tower_flops(v.depth, n, v.dim, v.block.mlp_ratio, pooled_only)
            flops += embed + blocks
            frozen = _frozen(recipe, cfg, "visual") and not (v.cond_dim or v.cond_tokens)
            embed_frozen = frozen or "visual.patch_embed" in recipe.train.freeze
            train += (1 if frozen else 3) * blocks + (1 if embed_frozen else 2) * embed
            if not frozen:
                gated = (v.cond_depth or v.depth) if v.cond_dim else 0
                fc2 = _unsaved_fc2(v.depth, n, v.dim, v.block, gated, pooled_only)
                rerun += blocks - images * fc2
            act += images * v.depth * 34 * n * v.dim
            ckpt += images * v.depth * 2 * n * v.dim
            peak_layer = max(peak_layer, images * 34 * n * v.dim)
        if "text" in needs and cfg.text is not None:
            t = cfg.text
            n = n_text
            # pooled-only without a token objective on this source (the Task runs sources of
            # one text length in one call, in full if any reads tokens: counted per source)
            pooled_only = not kinds & set(TOKEN_MEAN) and t.pool != "mean"
            blocks = _tower_flops(t.depth, n, t.dim, t.block.mlp_ratio, pooled_only)
            frozen = _frozen(recipe, cfg, "text")
            flops += blocks
            train += (1 if frozen else 3) * blocks
            if not frozen:
                rerun += blocks - _unsaved_fc2(t.depth, n, t.dim, t.block, 0, pooled_only)
            act += t.depth * 34 * n * t.dim
            ckpt += t.depth * 2 * n * t.dim
            peak_layer = max(peak_layer, 34 * n * t.dim)
            if kinds & {"next_token", "captioning"}:
                flops += 2 * n * t.dim * t.vocab_size
                train += 3 * 2 * n * t.dim * t.vocab_size
            for o in recipe.objectives.values():
                if o.source == name and o.type in ("next_token", "captioning"):
                    # fused (mmssl/nn/linear_ce.py): one buffer in the compute dtype, its
                    # gradient written over it; plain: 16-bit logits, fp32 copy, its grad
                    logits += n * t.vocab_size * (compute if o.fused_head else 2 + 4 + 4)
            if "captioning" in kinds and cfg.caption is not None and cfg.caption.mode == "cross":
                v_tokens = (side // cfg.vision.patch_size) ** 2
                # self-attention block, then cross-attention: q and output projections on
                # the text, k and v projections of the image tokens (vision width -> text
                # width), and the attention itself
                per = (
                    _block_flops(n, t.dim, t.block.mlp_ratio)
                    + 4 * n * t.dim * t.dim
                    + 4 * v_tokens * cfg.vision.dim * t.dim
                    + 4 * n * v_tokens * t.dim
                )
                depth = cfg.caption.depth
                flops += depth * per
                train += 3 * depth * per
                rerun += depth * per - _unsaved_fc2(depth, n, t.dim, t.block, 0, False)
                act += depth * 34 * n * t.dim
                ckpt += depth * 2 * n * t.dim
            if "captioning" in kinds and cfg.caption is not None and cfg.caption.mode == "prefix":
                # the text tower again, on the image tokens (projected to its width) + the text
                m = (side // cfg.vision.patch_size) ** 2 + n
                blocks = _tower_flops(t.depth, m, t.dim, t.block.mlp_ratio, False)
                proj = 2 * (m - n) * cfg.vision.dim * t.dim
                flops += blocks + proj
                train += 3 * (blocks + proj)
                rerun += blocks - _unsaved_fc2(t.depth, m, t.dim, t.block, 0, False)
                act += t.depth * 34 * m * t.dim
                ckpt += t.depth * 2 * m * t.dim
    return Workload(flops, train, rerun, act, ckpt + peak_layer, logits)


def training_flops(work: Workload, checkpointing: bool) -> float:
    """Forward + backward FLOPs per sample, with what activation checkpointing recomputes."""
    return work.training + (work.recomputed if checkpointing else 0.0)


def count_params(recipe: Any, cfg: Any) -> tuple[int, int, int]:
    """(trained parameters of the Task, parameters of the exported model, parameters held but
    not trained: train.freeze), built on meta."""
    import torch

    from mmssl.models.multimodal import MultimodalModel
    from mmssl.train.freeze import apply_freeze
    from mmssl.train.streams import tokenizer as recipe_tokenizer
    from mmssl.train.tasks import Task

    with torch.device("meta"):
        task = Task(MultimodalModel(cfg), recipe.objectives, recipe_tokenizer(recipe))
    apply_freeze(task.model, recipe.train.freeze)
    trained = sum(p.numel() for p in task.parameters() if p.requires_grad)
    return trained, task.model.num_params(), sum(p.numel() for p in task.parameters()) - trained


def memory(
    psi: int,
    stage: int,
    n: int,
    bf16: bool,
    offload: bool,
    offload_param: bool = False,
    frozen: int = 0,
) -> dict[str, float]:
    """Bytes per rank of parameters, gradients and optimizer states (ZeRO paper, K = 12).

    offload: `offload_optimizer` on the host; offload_param: `offload_param` on the host."""
    # fp32 ZeRO 1/2 keep a master partition besides the parameters (stage_1_and_2 clones it)
    k = 12 if bf16 or stage in (1, 2) else 8
    p, g = (2, 2) if bf16 else (4, 4)
    out = {  # frozen parameters (train.freeze): weights only, partitioned as the rest
        "parameters": p * (psi + frozen) / (n if stage >= 3 else 1),
        "gradients": g * psi / (n if stage >= 2 else 1),
        "optimizer states": k * psi / (n if stage >= 1 else 1),
    }
    if offload:  # gradients are reduced into host partitions (the buckets aside)
        out["optimizer states"] = out["gradients"] = 0.0
    if offload_param and stage == 3:
        out["parameters"] = 0.0
    return out


def plan(
    recipe: Any, gpus: int, gpu_mem: float, tflops: float, mfu: float, bandwidth: float
) -> list[str]:
    """The report, as lines."""
    from mmssl.train.ds_config import deepspeed_config
    from mmssl.train.engine import zero_stage
    from mmssl.train.recipe import grad_accum_steps, model_config

    cfg = model_config(recipe)
    accum = grad_accum_steps(recipe, gpus)
    ds = deepspeed_config(recipe, accum)
    stage = zero_stage(ds)
    zero = ds.get("zero_optimization", {})
    offload, offload_param = (
        (zero.get(key) or {}).get("device", "none") in ("cpu", "nvme")
        for key in ("offload_optimizer", "offload_param")
    )
    bf16 = recipe.precision == "bf16"
    psi, exported, frozen = count_params(recipe, cfg)
    work = workload(recipe, cfg)
    ckpt = recipe.train.activation_checkpointing
    micro, glob = recipe.train.micro_batch_size, recipe.train.global_batch_size
    act_scale = 1.0 if bf16 else 2.0
    act = micro * act_scale * (work.checkpointed_bytes if ckpt else work.activation_bytes)
    act += micro * work.logits_bytes  # already at the recipe's precision
    mem = memory(psi, stage, gpus, bf16, offload, offload_param, frozen)
    mem["activations"] = act
    total = sum(mem.values())
    train_flops = training_flops(work, ckpt)
    compute = train_flops * glob / (gpus * tflops * 1e12 * mfu)
    per = {0: 2, 1: 2, 2: accum + 1}.get(stage, 3 * accum)  # Psi-sized collectives a step
    comm_bytes = per * psi * (gpus - 1) / gpus * (2 if bf16 else 4)
    comm = comm_bytes / (bandwidth * GB)
    step = max(compute, comm)
    lines = [
        f"recipe {recipe.name}: model {recipe.model.name}, {gpus} GPUs, ZeRO stage {stage}"
        f"{' + CPU offload' if offload else ''}, {recipe.precision}"
        f"{', activation checkpointing' if ckpt else ''}",
        f"batch: global {glob} = {gpus} ranks x micro {micro} x {accum} accumulation steps",
        f"parameters: {psi / 1e6:.2f} M trained ({exported / 1e6:.2f} M in the exported model)"
        + (
            f", {frozen / 1e6:.2f} M frozen (train.freeze: held as weights; compute counts "
            "their backward, traffic does not count their ZeRO-3 gathers)"
            if frozen
            else ""
        ),
        f"FLOPs per sample: {work.flops / 1e9:.2f} GFLOP forward, {train_flops / 1e9:.2f} GFLOP "
        "forward + backward" + (", recomputation included" if ckpt else ""),
        "memory per rank:",
    ]
    lines += [f"  {k:<17} {v / GB:8.2f} GB" for k, v in mem.items()]
    fits = "fits" if total <= gpu_mem * GB else "DOES NOT FIT"
    lines += [
        f"  {'total':<17} {total / GB:8.2f} GB of {gpu_mem:g} GB ({fits}; excludes framework "
        f"buffers, fragmentation and ZeRO bucket sizes)",
        f"step time: {step:.3f} s (compute {compute:.3f} s at {tflops:g} TFLOPS x MFU {mfu:g}; "
        f"gradient/parameter traffic {comm_bytes / GB:.2f} GB per rank, "
        f"{comm:.3f} s at {bandwidth:g} GB/s, overlapped)",
        f"throughput: {glob / step:,.0f} samples/s; {recipe.train.steps} steps take "
        f"{recipe.train.steps * step / 3600:.1f} h",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    """`mmssl plan RECIPE --gpus N ...`: prints the plan; exit code 0, or 2 on bad input."""
    p = ArgumentParser(prog="mmssl plan", description=summary(__doc__))
    p.add_argument("recipe")
    # default=[]: a missing recipe is reported alone (see `mmssl.train.cli`)
    p.add_argument("overrides", nargs="*", default=[], help="dotted recipe overrides")
    p.add_argument("--gpus", type=int, required=True, help="number of data-parallel ranks")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GB")
    p.add_argument(
        "--tflops",
        type=float,
        default=312.0,
        help="peak dense TFLOPS per GPU at the recipe's precision (A100 bf16: 312)",
    )
    p.add_argument(
        "--mfu",
        type=float,
        default=0.4,
        help="the fraction of --tflops reached on the FLOPs counted (activation checkpointing's "
        "recomputation included)",
    )
    p.add_argument(
        "--bandwidth",
        type=float,
        default=25.0,
        help="data-parallel bandwidth per rank in GB/s (200 Gb/s InfiniBand: 25)",
    )
    args = p.parse_intermixed_args(argv)  # overrides before or after options
    from mmssl.train.recipe import check_recipe, grad_accum_steps, load_recipe, model_config
    from mmssl.train.streams import check_data

    positive = (lambda v: v > 0, "> 0")
    rules = {"gpus": positive, "gpu_mem": positive, "tflops": positive, "bandwidth": positive}
    problem = check_numbers(args, {**rules, "mfu": (lambda v: 0 < v <= 1, "in (0, 1]")})
    if problem:
        p.error(problem)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        # what training refuses: `-5 steps take -0.0 h` was printed, and objective values
        # it refuses (a temperature of 0) ended in a traceback; and what its streams refuse
        # (an image size off the patch grid, a context past the model's)
        check_recipe(recipe)
        grad_accum_steps(recipe, args.gpus)  # first, as training: its message on a 0 batch
        check_data(recipe, model_config(recipe), args.gpus)
        lines = plan(recipe, args.gpus, args.gpu_mem, args.tflops, args.mfu, args.bandwidth)
    except (ConfigError, OSError) as err:  # OSError: a recipe or path unreadable, too long
        print(f"mmssl plan: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0
