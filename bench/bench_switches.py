"""The recipe's fast-path switches, through the real DeepSpeed engine: `optim.impl` and
`train.compile`, each against the default recipe, on the same weights and batches.

    python bench/bench_switches.py [--model vit_s16] [--image-size 112] [--batch 16]
        [--compile | --no-compile]

Every path is one engine built by mmssl's training path (recipe -> validate -> Task ->
`mmssl.train.engine.initialize`, ZeRO-0, one process, fp32) with a SimCLR objective on
2 views of `--batch` synthetic images; one step = engine forward, backward and step.  The
paths alternate round by round (bench/common.py).  `optim.impl=deepspeed` (the default)
needs DeepSpeed's FusedAdam extension, which is built on first use (minutes): the path is
skipped when the extension is not built yet, unless --build-extension is given.
`train.compile=true` runs by default (--no-compile leaves it out; --quick too, unless
--compile is given); a compilation that fails runs the Blocks eagerly (mmssl.nn.compile's
fallback), and the row's name then says so.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PATHS = {  # name -> recipe overrides
    "optim.impl=deepspeed (default)": {"optim": {"impl": "deepspeed"}},
    "optim.impl=torch": {"optim": {"impl": "torch"}},
    "optim.impl=foreach": {"optim": {"impl": "foreach"}},
    "optim.impl=fused": {"optim": {"impl": "fused"}},
    "optim.impl=fused, train.compile=true": {
        "optim": {"impl": "fused"},
        "train": {"compile": True},
    },
}


def deepspeed_adam_built() -> bool:
    """Whether DeepSpeed's FusedAdam extension is already in the torch extensions cache."""
    from torch.utils.cpp_extension import _get_build_directory

    try:
        build = Path(_get_build_directory("fused_adam", verbose=False))
    except Exception:  # noqa: BLE001 -- any failure means: not known to be built
        return False
    return (build / "fused_adam.so").is_file()


def compile_fallback(module: torch.nn.Module) -> str | None:
    """Why the compiled Blocks of `module` run eagerly (mmssl.nn.compile's fallback), or None."""
    from mmssl.nn.compile import CompiledForward

    for m in module.modules():
        forward = getattr(m, "forward", None)
        if isinstance(forward, CompiledForward) and forward.failed:
            return forward.failed
    return None


def make_step(name: str, overrides: dict, args) -> tuple[common.Run, float, torch.nn.Module]:
    """An engine for `overrides` -> (its Run, the loss of its first batch, for a check, and
    the engine's module)."""
    from mmssl.models.multimodal import MultimodalModel
    from mmssl.train.engine import initialize
    from mmssl.train.loop import to_device
    from mmssl.train.recipe import recipe_from_dict, validate
    from mmssl.train.streams import build_streams
    from mmssl.train.tasks import Task

    train = {"micro_batch_size": args.batch, "global_batch_size": args.batch, "steps": 1000}
    recipe = recipe_from_dict(
        {
            "model": {
                "name": args.model,
                "overrides": {"vision": {"image_size": args.image_size}},
            },
            "data": {"sources": {"train": {"kind": "image"}}, "views": 2},
            "objectives": {"simclr": {}},
            "optim": {"lr": 1e-4, **overrides.get("optim", {})},
            "train": {**train, **overrides.get("train", {})},
        }
    )
    resolved = validate(recipe, world_size=1)
    torch.manual_seed(0)
    task = Task(MultimodalModel(resolved.model), recipe.objectives)
    engine = initialize(task, recipe, resolved.ds_config)
    stream = build_streams(recipe, resolved.model, 0, 1)["train"]
    batch = {"train": to_device(stream.next(), torch.device("cpu"), torch.float32)}
    with torch.no_grad():
        first = float(engine.module(batch)[0])

    def step() -> None:
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()

    return common.Run(name, "mmssl", "float32", step), first, engine.module


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(__doc__, bf16=False, compile=False)
    p.add_argument("--batch", type=int, default=16, help="images per step (x 2 views)")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--model", default="vit_s16")
    p.add_argument("--build-extension", action="store_true", help="allow the FusedAdam build")
    compile_opts = p.add_mutually_exclusive_group()
    compile_opts.add_argument(
        "--compile",
        action="store_true",
        help="time train.compile=true even with --quick (without --quick it runs by default)",
    )
    compile_opts.add_argument(
        "--no-compile", action="store_true", help="leave out train.compile=true"
    )
    args = p.parse_args(argv)
    problem = common.args_problem(args, {"batch": 2, "image_size": 1}, models="mmssl")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    common.apply_quick(args, min_batch=2)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    threads = common.set_threads(args.threads)
    from mmssl.train.engine import init_distributed

    peaks = {"float32": common.matmul_peak(torch.float32, reps=3)}
    init_distributed()
    runs, firsts, modules = [], {}, {}
    for name, overrides in PATHS.items():
        if "deepspeed" in name and not (args.build_extension or deepspeed_adam_built()):
            skipped = common.Run(name, "mmssl", "float32", lambda: None)
            skipped.skipped = "DeepSpeed FusedAdam extension not built (--build-extension)"
            runs.append(skipped)
            continue
        if "compile" in name and (args.no_compile or (args.quick and not args.compile)):
            continue
        run, firsts[name], modules[name] = make_step(name, overrides, args)
        runs.append(run)
    spread = max(firsts.values()) - min(firsts.values())
    print(f"same weights and batch: first losses within {spread:.1e}")
    flops = common.count_flops(next(r for r in runs if not r.skipped).step)
    timed = {r.name: r for r in runs if not r.skipped}
    base = timed.get("optim.impl=deepspeed (default)") or timed["optim.impl=torch"]
    base.side = "peer"  # the reference of the ratios: the default recipe
    print(f"torch threads {threads}; timing {sum(not r.skipped for r in runs)} paths", flush=True)
    rounds = common.alternate(runs, args.rounds, args.budget, 2 if args.quick else 3, peaks)
    for run in runs:
        reason = compile_fallback(modules[run.name]) if run.name in modules else None
        if reason:  # the row timed eager Blocks: not what its name would claim
            print(f"  {run.name}: compilation failed, the Blocks ran eagerly ({reason})")
            run.name += " (compile failed: ran eagerly)"
    config = {
        "model": args.model,
        "image_size": args.image_size,
        "images": f"{args.batch} x 2 views",
        "objective": "simclr",
        "engine": "DeepSpeed ZeRO-0 fp32, 1 process",
        "threads": threads,
    }
    record = common.summarize(
        "Recipe fast-path switches (DeepSpeed engine step)",
        config,
        runs,
        flops,
        peaks,
        rounds,
        ("images/s", 2 * args.batch),
    )
    print(f"  speed-ups over {base.name} (wall / CPU):")
    cpu = statistics.median
    for r in timed.values():
        if r is not base:
            print(
                f"    {r.name}: {base.median / r.median:.2f}x / "
                f"{cpu(base.cpu_times) / cpu(r.cpu_times):.2f}x"
            )
    record["command"] = "python bench/bench_switches.py " + " ".join(argv or sys.argv[1:])
    common.write_json(record, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
