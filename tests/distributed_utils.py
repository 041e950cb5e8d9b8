"""Run a function on N real gloo processes (CPU) and collect each rank's result.

    from distributed_utils import run_distributed
    results = run_distributed(fn, 2, arg1, arg2)   # [fn(arg1, arg2) on rank 0, on rank 1]

`fn` must be importable by the spawned children (a module-level function of a test
module or of mmssl). It runs after `torch.distributed.init_process_group("gloo")`, reads
its rank through `mmssl.distributed.rank()`, and returns anything picklable. Exceptions in a
child are re-raised in the parent with the child's traceback; a run that exceeds `timeout`
seconds is killed and raises TimeoutError, so a deadlocked collective never hangs CI.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

DEFAULT_TIMEOUT = 120.0


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    # the machine is shared: one intra-op thread per rank keeps timings and results stable
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        out = fn(*args)
        # plain pickle: tensors travel by value, not through shared memory of a dying process
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Any]:
    """Run `fn(*args)` on `world_size` gloo ranks; return the results in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"distributed run of {fn.__name__} exceeded {timeout:.0f} s")
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and not errors:
                    codes = [p.exitcode for p in dead]
                    msg = f"a rank died without reporting (exit codes {codes})"
                    raise RuntimeError(msg) from None
                continue
            if ok:
                out[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                # the other ranks are likely blocked in a collective with the dead one
                break
        if errors:
            raise RuntimeError("distributed run failed\n" + "\n".join(errors))
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return [out[r] for r in range(world_size)]
