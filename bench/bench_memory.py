"""Memory per rank under DeepSpeed ZeRO 0, 2 and 3 with 2 real ranks (gloo, CPU).

    python bench/bench_memory.py [--model vit_s16] [--stages 0,2,3] [--precision fp32,bf16]

Each (stage, precision) runs in 2 fresh processes (so each peak is its own), through mmssl's
training path: recipe -> validate -> Task -> `mmssl.train.engine.initialize` -> a few
SimCLR steps on synthetic images.  Images are small (64 px, 17 tokens) so that parameters
and optimizer state, not activations, dominate.  Per rank, after the last step:
- params: bytes of the parameter storage the rank holds (the full tensors, or under ZeRO-3
  each parameter's `ds_tensor` partition plus the parameters kept whole by the persistence
  threshold);
- optimizer: bytes of the tensors the optimizer owns beyond those (fp32 master partitions,
  Adam moments); every storage is counted once (ZeRO-1/2 parameters are views of one flat
  buffer; in fp32 ZeRO-3 the master partition is the `ds_tensor` buffer itself);
- live tensors: every tensor reachable from Python (gc), deduplicated by storage;
- peak RSS: VmHWM, reset after the imports (/proc/self/clear_refs), so it is the peak of
  model + engine + steps; the absolute peak (imports included) is given as well.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from mmssl.cliargs import summary
from mmssl.train.recipe import OptimConfig

HERE = Path(__file__).resolve().parent
MB = 2**20


# ----------------------------------------------------------------------------- worker


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _storages(tensors: list, seen: set[int]) -> int:
    """Bytes of the storages of `tensors` not yet in `seen` (which is updated)."""
    total = 0
    for t in tensors:
        if t is None or t.numel() == 0 or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += storage.nbytes()
    return total


def held_bytes(engine) -> dict[str, int]:
    """Parameter, optimizer and all-live-tensor bytes this rank holds (storages counted once)."""
    import torch

    seen: set[int] = set()
    model_params = list(engine.module.parameters())
    params = _storages([p.data for p in model_params], seen)
    params += _storages([getattr(p, "ds_tensor", None) for p in model_params], seen)
    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)
    owned = [p for g in inner.param_groups for p in g["params"]]
    # ZeRO-3 empties param_groups between steps: the master partitions are the state's keys
    owned += [k for k in inner.state if isinstance(k, torch.Tensor)]
    owned += [v for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    optimizer = _storages(owned, seen)
    others = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not o.is_meta]
    largest = sorted(
        (t for t in others if t.numel() and t.untyped_storage().data_ptr() not in seen),
        key=lambda t: -t.untyped_storage().nbytes(),
    )
    top, ptrs = [], set()
    for t in largest:
        if t.untyped_storage().data_ptr() not in ptrs and len(top) < 4:
            ptrs.add(t.untyped_storage().data_ptr())
            top.append(
                f"{str(t.dtype)[6:]}{list(t.shape)} {t.untyped_storage().nbytes() / MB:.0f} MB"
            )
    live = params + optimizer + _storages(others, seen)
    return {"params": params, "optimizer": optimizer, "live": live, "largest_other": top}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    import deepspeed  # noqa: F401 -- imported before the RSS baseline

    from mmssl.models.multimodal import MultimodalModel
    from mmssl.train.engine import init_distributed, initialize
    from mmssl.train.loop import seed_everything, to_device
    from mmssl.train.recipe import recipe_from_dict, validate
    from mmssl.train.streams import build_streams
    from mmssl.train.tasks import Task
    from mmssl.train.zero3 import register_zero3_params

    world = int(os.environ["WORLD_SIZE"])
    recipe = recipe_from_dict(
        {
            "name": "bench_memory",
            "model": {"name": args.model, "overrides": {"vision": {"image_size": args.image_size}}},
            "data": {"sources": {"train": {"kind": "image"}}, "views": 2},
            "objectives": {"simclr": {}},
            "precision": args.precision,
            "optim": {"impl": args.impl},
            "train": {
                "deepspeed": args.ds_json or f"zero{args.stage}",
                "micro_batch_size": args.batch,
                "global_batch_size": args.batch * world,
                "steps": args.steps,
            },
        }
    )
    resolved = validate(recipe, world_size=world)
    init_distributed()
    import torch.distributed as dist

    rank = dist.get_rank()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    gc.collect()
    base_rss = _status_kb("VmRSS")
    reset = _reset_peak_rss()

    seed_everything(0)
    task = Task(MultimodalModel(resolved.model), recipe.objectives)
    num_params = sum(p.numel() for p in task.parameters())
    engine = initialize(task, recipe, resolved.ds_config)
    if args.stage == 3:
        register_zero3_params(engine.module)
    gc.collect()
    init_peak = _status_kb("VmHWM")  # model build + engine initialisation
    stream = build_streams(recipe, resolved.model, rank, world)["train"]
    times = []
    for _ in range(args.steps):
        batch = {"train": to_device(stream.next(), torch.device("cpu"), dtype)}
        t0 = time.perf_counter()
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
    dist.barrier()
    gc.collect()
    record = {
        "rank": rank,
        "stage": args.stage,
        "precision": args.precision,
        "num_params": num_params,
        "optimizer_class": type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__,
        "wrapper": type(engine.optimizer).__name__,
        **held_bytes(engine),
        "base_rss": base_rss * 1024,
        "peak_rss": _status_kb("VmHWM") * 1024,
        "end_rss": _status_kb("VmRSS") * 1024,
        "init_peak_rss": init_peak * 1024,
        "peak_reset": reset,
        "step_s": times,
        "loss": float(loss.detach()),
    }
    Path(args.out).with_suffix(f".{rank}.json").write_text(json.dumps(record))
    dist.barrier()


# ----------------------------------------------------------------------------- launcher


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ds_json(stage: int, bucket: int, tmp: Path) -> Path:
    """The shipped recipes/deepspeed/zero{stage}.json with every bucket size set to `bucket`."""
    data = json.loads((HERE.parent / "recipes" / "deepspeed" / f"zero{stage}.json").read_text())
    zero = data.get("zero_optimization", {})
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
        if key in zero:
            zero[key] = bucket
    path = tmp / f"zero{stage}_bucket{bucket}.json"
    path.write_text(json.dumps(data))
    return path


def launch(args: argparse.Namespace, stage: int, precision: str, tmp: Path) -> list[dict]:
    """Run the worker on `args.ranks` fresh processes; their records in rank order."""
    out = tmp / f"z{stage}_{precision}"
    port = _free_port()
    procs = []
    for rank in range(args.ranks):
        env = {
            **os.environ,
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(HERE.parent),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(args.ranks),
            "LOCAL_WORLD_SIZE": str(args.ranks),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            f"--stage={stage}",
            f"--precision={precision}",
            f"--model={args.model}",
            f"--image-size={args.image_size}",
            f"--batch={args.batch}",
            f"--steps={args.steps}",
            f"--impl={args.impl}",
            f"--out={out}",
        ]
        if args.bucket_size:
            cmd.append(f"--ds-json={_ds_json(stage, int(args.bucket_size), tmp)}")
        log = open(tmp / f"z{stage}_{precision}.{rank}.log", "w")  # noqa: SIM115
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for rank, (proc, log) in enumerate(procs):
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            for other, _ in procs:
                other.kill()
            code = "timeout"
        log.close()
        if code != 0:
            failed.append((rank, code))
    if failed:
        tail = (tmp / f"z{stage}_{precision}.{failed[0][0]}.log").read_text()[-3000:]
        raise RuntimeError(f"ZeRO-{stage} {precision}: ranks {failed} failed:\n{tail}")
    return [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in range(args.ranks)]


def report(records: dict[tuple[int, str], list[dict]]) -> tuple[dict, list[str]]:
    """The table and the ratios to ZeRO-0 (printed); returns the JSON record and the lines."""
    lines = [
        "| ZeRO | precision | rank | params MB | optimizer MB | params+opt MB | B/param "
        "| live tensors MB | peak RSS MB above imports (of which init) | peak RSS MB absolute "
        "| step s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows, ratios = [], {}
    for (stage, precision), recs in sorted(records.items()):
        for r in recs:
            both = r["params"] + r["optimizer"]
            above = r["peak_rss"] - r["base_rss"] if r["peak_reset"] else float("nan")
            step = sorted(r["step_s"])[len(r["step_s"]) // 2]
            init = r["init_peak_rss"] - r["base_rss"] if r["peak_reset"] else float("nan")
            lines.append(
                f"| {stage} | {precision} | {r['rank']} | {r['params'] / MB:.1f} | "
                f"{r['optimizer'] / MB:.1f} | {both / MB:.1f} | {both / r['num_params']:.2f} | "
                f"{r['live'] / MB:.1f} | {above / MB:.0f} ({init / MB:.0f}) | "
                f"{r['peak_rss'] / MB:.0f} | {step:.2f} |"
            )
            rows.append({**r, "params_plus_optimizer": both, "peak_above_imports": above})
    lines.append("")
    for precision in sorted({p for _, p in records}):
        if (0, precision) not in records:
            continue

        def worst(stage: int, key: str, precision: str = precision) -> float:
            recs = records[(stage, precision)]
            if key == "both":
                return max(r["params"] + r["optimizer"] for r in recs)
            if key == "above":
                return max(r["peak_rss"] - r["base_rss"] for r in recs)
            return max(r["peak_rss"] for r in recs)

        for stage in sorted(s for s, p in records if p == precision and s != 0):
            for key, label in (
                ("both", "params+optimizer"),
                ("above", "peak RSS above imports"),
                ("rss", "peak RSS absolute"),
            ):
                value = worst(stage, key) / worst(0, key)
                name = f"{precision} ZeRO-{stage} / ZeRO-0, {label} (max over ranks)"
                ratios[name] = value
                target = " (target <= 0.60)" if stage == 3 and key == "both" else ""
                lines.append(f"- {name}: **{value:.2f}x**{target}")
    largest = {
        f"ZeRO-{s} {p}": recs[0]["largest_other"]
        for (s, p), recs in sorted(records.items())
        if recs[0]["largest_other"]
    }
    lines += ["", "Largest other live tensors on rank 0 (buffers, batches):", ""]
    lines += [f"- {k}: {', '.join(v)}" for k, v in largest.items()]
    print("\n" + "\n".join(lines))
    return {"rows": rows, "ratios": ratios}, lines


NOTES = """Reading the table: B/param is (params + optimizer) bytes per model parameter.  fp32
ZeRO-0 holds weights and two Adam moments (12 B); ZeRO-2 keeps the full weights and splits an
fp32 master copy and the moments over the ranks (4 + 12/2 = 10 B); ZeRO-3 splits everything,
and in fp32 its master partition is the parameter partition itself (12/2 = 6 B).  bf16 adds an
fp32 master copy to ZeRO-0 (2 + 12 = 14 B; ZeRO-2: 2 + 12/2 = 8 B; ZeRO-3: 14/2 = 7 B).
Peak RSS also holds gradients, activations, the all-gather/reduce buckets of the DeepSpeed
JSON (ZeRO-3 allocates one of `reduce_bucket_size` elements: 50M, 191 MB in fp32, with the
shipped recipes/deepspeed/zero3.json, more than this model) and memory the allocator keeps;
--bucket-size sets the bucket sizes of every stage's JSON.  "of which init" is the peak
reached by the model build and `deepspeed.initialize`: every rank builds the whole model
before ZeRO-3 partitions it (no `deepspeed.zero.Init`) and DeepSpeed copies it into flat
buffers, so at this size and 2 ranks ZeRO-3 lowers the steady state (params + optimizer,
live tensors) but not the peak RSS."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=summary(__doc__))
    p.add_argument("--model", default="vit_s16", help="a registry name (vision tower needed)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=2, help="images per rank per step")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--stages", default="0,2,3")
    p.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--impl", default="torch", help="optim.impl (deepspeed builds an extension)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    p.add_argument("--bucket-size", type=float, default=None, help="ZeRO bucket sizes")
    p.add_argument("--json", default=None, help="write the record here")
    p.add_argument("--markdown", default=None, help="write a RESULTS.md section here")
    p.add_argument("--ds-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    least = {"image_size": 1, "batch": 1, "steps": 1, "ranks": 2, "timeout": 1, "bucket_size": 1}
    problem = common.args_problem(args, least, models="mmssl")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.worker:
        worker(args)
        return 0
    try:
        stages = [int(s) for s in args.stages.split(",")]
    except ValueError:
        stages = []
    precisions = args.precision.split(",")
    if not stages or any(s not in (0, 1, 2, 3) for s in stages) or 0 not in stages:
        print("error: --stages must list ZeRO stages in 0..3, including 0", file=sys.stderr)
        return 2
    if any(x not in ("fp32", "bf16") for x in precisions):
        print("error: --precision takes fp32,bf16", file=sys.stderr)
        return 2
    impls = typing.get_args(typing.get_type_hints(OptimConfig)["impl"])  # optim.impl values
    if args.impl not in impls:
        print(f"error: --impl takes one of {', '.join(impls)}, got {args.impl!r}", file=sys.stderr)
        return 2
    print(
        f"model {args.model} at {args.image_size} px, {args.batch} images x 2 views per rank, "
        f"{args.steps} steps, {args.ranks} ranks (1 thread each), optim.impl={args.impl}",
        flush=True,
    )
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions:
            for stage in stages:
                t0 = time.perf_counter()
                records[(stage, precision)] = launch(args, stage, precision, Path(tmp))
                r0 = records[(stage, precision)][0]
                print(
                    f"  ZeRO-{stage} {precision}: {time.perf_counter() - t0:.0f} s, "
                    f"{r0['num_params'] / 1e6:.1f}M params, {r0['wrapper']} over "
                    f"{r0['optimizer_class']}, loss {r0['loss']:.4f}",
                    flush=True,
                )
    out, lines = report(records)
    out["config"] = {
        "model": args.model,
        "image_size": args.image_size,
        "batch_per_rank": args.batch,
        "steps": args.steps,
        "ranks": args.ranks,
        "optim.impl": args.impl,
        "buckets": int(args.bucket_size) if args.bucket_size else "recipes/deepspeed/zero*.json",
    }
    out["command"] = "python bench/bench_memory.py " + " ".join(argv or sys.argv[1:])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.markdown:
        cfg = ", ".join(f"{k}={v}" for k, v in out["config"].items())
        head = ["### Memory per rank, ZeRO 0/2/3", "", f"Command: `{out['command']}`  "]
        head += [f"Config: {cfg}; params {records[(0, precisions[0])][0]['num_params']:,}", ""]
        Path(args.markdown).write_text("\n".join(head + lines + ["", NOTES, ""]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
