"""One rank of a fault-suite launch: run `mmssl.train.cli.main` for each entry of a JSON list
and record exit codes, open file descriptors and child processes before and after.

argv[1]: JSON list of {"args": [...], "env": {...}}; argv[2]: output folder, where each rank
writes rank<R>.json.  Exit codes do not stop the list: a scenario may expect a failure.
"""

import gc
import json
import os
import sys
from pathlib import Path


def _fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # the fd of the listing itself
    return sorted(out)


def _children() -> list[int]:
    pids: list[int] = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    return pids


if __name__ == "__main__":
    runs, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    from mmssl.train.cli import main
    from mmssl.train.engine import init_distributed

    init_distributed()  # the process group outlives a run: its sockets are no leak

    rank = os.environ.get("RANK", "0")
    results = []
    for run in runs:
        os.environ.update(run.get("env", {}))
        gc.collect()
        before = _fds()
        code = main(run["args"])
        gc.collect()
        results.append(
            {"code": code, "fds_before": before, "fds_after": _fds(), "children": _children()}
        )
        for key in run.get("env", {}):
            os.environ.pop(key, None)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(results))
