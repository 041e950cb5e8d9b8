"""Helpers of the fault suite: 2-rank launches that can be paused and SIGKILLed, key logs,
weights of a run, /proc readings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from train_helpers import PYTHON, RECIPES, REPO, clean_env, free_port, tiny_overrides

FULL = os.environ.get("MMSSL_FAULTS_FULL", "") == "1"
DRIVER = Path(__file__).with_name("fault_driver.py")
QUICK = str(RECIPES / "quickstart.yaml")
LAUNCHES: list[Launch] = []  # killed at the end of each test if still running (conftest)


def tiny_run(demo: str, out: str, name: str, *extra: str) -> list[str]:
    """CLI args of the tiny quickstart run on the demo data (2 ranks x micro-batch 8)."""
    return [QUICK, *tiny_overrides(demo, out, name), "logging.keys=true", *extra]


class Launch:
    """`world` ranks of fault_driver.py started directly (RANK, WORLD_SIZE, MASTER_* in the
    environment, as a launcher would), all in one new process group so that one SIGKILL
    takes the ranks, their data-loader workers and pipe: commands at once."""

    def __init__(
        self,
        runs: list[dict[str, Any]],
        out: Path,
        world: int = 2,
        faults: str = "",
        **env: str,
    ) -> None:
        self.out, self.world = out, world
        LAUNCHES.append(self)
        out.mkdir(parents=True, exist_ok=True)
        port = str(free_port())
        self.procs: list[subprocess.Popen] = []
        self.logs = [out / f"rank{r}.log" for r in range(world)]
        for r in range(world):
            penv = clean_env(
                RANK=str(r),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(r),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                MMSSL_FAULTS=faults,
                **env,
            )
            group = 0 if r == 0 else self.pgid
            try:
                with open(self.logs[r], "w") as log:
                    self.procs.append(
                        subprocess.Popen(
                            [PYTHON, str(DRIVER), json.dumps(runs), str(out / "results")],
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            env=penv,
                            cwd=str(REPO),
                            process_group=group,
                        )
                    )
            except BaseException:
                if self.procs:
                    self.kill()
                raise

    @property
    def pgid(self) -> int:
        return self.procs[0].pid

    def tail(self, n: int = 3000) -> str:
        return "\n".join(f"--- rank {r}\n{p.read_text()[-n:]}" for r, p in enumerate(self.logs))

    def wait(self, timeout: float = 300) -> list[list[dict[str, Any]]]:
        """Wait for every rank; returns each rank's per-run records (exit code, fds, ...)."""
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"launch did not finish in {timeout} s\n{self.tail()}") from None
        codes = [p.returncode for p in self.procs]
        assert codes == [0] * self.world, f"driver exit codes {codes}\n{self.tail()}"
        return [
            json.loads((self.out / "results" / f"rank{r}.json").read_text())
            for r in range(self.world)
        ]

    def wait_paused(self, run_dir: Path, point: str, timeout: float = 300) -> list[int]:
        """Block until every rank announced the pause `point`; returns their pids."""
        files = [run_dir / ".faults" / f"{point}.rank{r}" for r in range(self.world)]
        deadline = time.monotonic() + timeout
        while not all(f.is_file() for f in files):
            if any(p.poll() is not None for p in self.procs):
                self.kill()
                raise AssertionError(f"a rank exited before pausing at {point}\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"no pause at {point} in {timeout} s\n{self.tail()}")
            time.sleep(0.05)
        return [int(f.read_text()) for f in files]

    def kill(self) -> None:
        """SIGKILL the whole process group (ranks, loader workers, pipe commands)."""
        if not self.procs:
            return
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in self.procs:
            p.wait(timeout=30)


def group_pids(pgid: int) -> list[int]:
    """Live processes of a process group, read from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry))
    return out


def wait_gone(pgid: int, timeout: float = 20.0) -> list[int]:
    """Processes of the group still alive after `timeout` s (SIGKILL is delivered, not
    instant: a process tears down its memory before it is gone)."""
    deadline = time.monotonic() + timeout
    while (alive := group_pids(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def key_log(run_dir: Path, rank: int) -> list[tuple[int, dict[str, list[str]]]]:
    """(step, {source: keys}) of every step in a rank's key log."""
    rows = [
        json.loads(x) for x in (run_dir / "keys" / f"rank{rank}.jsonl").read_text().splitlines()
    ]
    return [(r["step"], r["keys"]) for r in rows]


def key_counts(log: list[tuple[int, dict[str, list[str]]]]) -> Counter:
    return Counter((src, k) for _, keys in log for src, ks in keys.items() for k in ks)


def exported(run_dir: Path) -> dict[str, Any]:
    """The run's newest good checkpoint as exported safetensors weights."""
    from safetensors.torch import load_file

    from mmssl.train.export import export_run

    return load_file(str(export_run(run_dir, run_dir / "export") / "model.safetensors"))


def bitwise_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
