"""Multi-process training with the real DeepSpeed engine on CPU (gloo): ZeRO stages agree,
2-rank exact resume, the deepspeed launcher, and a simulated 2-node torchrun launch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed
from safetensors.torch import load_file
from train_helpers import BIN, RECIPES, clean_env, free_port, losses, run, tiny_overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
QUICK = str(RECIPES / "quickstart.yaml")
DRIVER = Path(__file__).with_name("train_driver.py")


def _stages_job(demo: str, out: str, stages: list[int]) -> dict[int | str, list[float]]:
    """On each rank: train 3 steps at each ZeRO stage, export; rank 0 reports the losses."""
    from mmssl import distributed
    from mmssl.train.cli import main
    from mmssl.train.export import export_run

    result: dict[int | str, list[float]] = {}
    for stage in stages:
        args = tiny_overrides(demo, out, f"zero{stage}") + [
            "train.steps=3",
            f"train.deepspeed=zero{stage}",
            "checkpoint.every=0",
        ]
        assert main([QUICK, *args]) == 0
        if distributed.rank() == 0:
            result[stage] = losses(Path(out) / f"zero{stage}")
            export_run(Path(out) / f"zero{stage}")
        distributed.barrier()
    # ZeRO-3 partitions the weights train.init_from loaded: a step too small to see keeps them
    args = tiny_overrides(demo, out, "zero3_init") + [
        "train.steps=1",
        "schedule.warmup_steps=0",
        "train.deepspeed=zero3",
        "checkpoint.every=0",
        f"train.init_from={out}/zero0/export",
        "optim.lr=1e-12",
        "optim.weight_decay=0",
    ]
    assert main([QUICK, *args]) == 0
    if distributed.rank() == 0:
        export_run(Path(out) / "zero3_init")
    distributed.barrier()
    # train.freeze (LiT) across ranks: ZeRO-1 leaves the frozen weights to its module state,
    # ZeRO-3 partitions them; both must keep them
    for stage in (1, 3):
        args = tiny_overrides(demo, out, f"lit{stage}") + [
            "train.steps=2",
            f"train.deepspeed=zero{stage}",
            "checkpoint.every=0",
            f"train.init_from={out}/zero0/export",
            "train.freeze=[visual]",
        ]
        assert main([QUICK, *args]) == 0
        if distributed.rank() == 0:
            export_run(Path(out) / f"lit{stage}")
        distributed.barrier()
    result.update(_joint_job(demo, out))
    return result


def test_zero_stages_agree(demo_data: str, tmp_path: Path) -> None:
    """fp32 losses of ZeRO 0, 1, 2, 3 on 2 ranks agree to 1e-5, and the ZeRO-3 checkpoint
    consolidates (zero_to_fp32) to the weights the stage-0 run holds.  In the same session
    joint.yaml (tiny) runs at ZeRO 0 and 3: its shared trunk runs image tokens and two text
    lengths, i.e. three calls of the same module per step, and ZeRO-3 matches ZeRO-0.  A
    ZeRO-3 run started from the stage-0 export (train.init_from) holds its weights, and LiT
    runs (train.freeze=[visual]) at ZeRO 1 and 3 keep its image tower exactly."""
    out = run_distributed(_stages_job, 2, demo_data, str(tmp_path), [0, 1, 2, 3], timeout=400)[0]
    for stage in (1, 2, 3):
        assert len(out[stage]) == 3
        for a, b in zip(out[0], out[stage]):
            assert abs(a - b) < 1e-5, (stage, out[0], out[stage])
    w0 = load_file(str(tmp_path / "zero0" / "export" / "model.safetensors"))
    w3 = load_file(str(tmp_path / "zero3" / "export" / "model.safetensors"))
    assert w0.keys() == w3.keys()
    for k in w0:
        torch.testing.assert_close(w0[k], w3[k], atol=1e-5, rtol=1e-4, msg=k)
    warm = load_file(str(tmp_path / "zero3_init" / "export" / "model.safetensors"))
    assert warm.keys() == w0.keys()
    for k in w0:
        torch.testing.assert_close(warm[k], w0[k], atol=1e-8, rtol=0, msg=k)
    for stage in (1, 3):  # locked: the image tower exactly, the rest trained
        lit = load_file(str(tmp_path / f"lit{stage}" / "export" / "model.safetensors"))
        assert lit.keys() == w0.keys()
        assert all(torch.equal(lit[k], w0[k]) for k in w0 if k.startswith("visual.")), stage
        assert (lit["text.proj.weight"] - w0["text.proj.weight"]).abs().max() > 1e-4, stage
    assert len(out["joint0"]) == 2
    for a, b in zip(out["joint0"], out["joint3"]):
        assert abs(a - b) < 1e-5, (out["joint0"], out["joint3"])


def _joint_job(demo: str, out: str) -> dict[str, list[float]]:
    from mmssl import distributed
    from mmssl.train.cli import main

    result = {}
    for stage in (0, 3):
        args = [
            f"name=joint{stage}",
            f"out_dir={out}",
            "train.steps=2",
            "schedule.warmup_steps=1",
            f"train.deepspeed=zero{stage}",
            "train.global_batch_size=16",
            "train.micro_batch_size=8",
            "data.workers=0",
            "logging.every=1",
            "logging.progress=false",
            "logging.tensorboard=false",
            "checkpoint.every=0",
            f"data.sources.digits.urls={demo}/digits/train-{{000000..000014}}.tar",
            f"data.sources.pydoc.urls={demo}/text/train-{{000000..000008}}.tar",
            "model.overrides.vision.dim=32",
            "model.overrides.text.dim=32",
            "model.overrides.vision.depth=2",
            "model.overrides.text.depth=2",
        ]
        assert main([str(RECIPES / "joint.yaml"), *args]) == 0
        if distributed.rank() == 0:
            result[f"joint{stage}"] = losses(Path(out) / f"joint{stage}")
    return result


@pytest.mark.parametrize("stage", [1])
def test_exact_resume_two_ranks(demo_data: str, tmp_path: Path, stage: int) -> None:
    """Stopped at step 2 and resumed, a 2-rank run ends bitwise equal to an uninterrupted one
    (data positions with a loader worker, per-rank drop_path RNG, LR schedule and ZeRO
    optimizer state)."""
    from mmssl.train.export import export_run

    base = tiny_overrides(demo_data, str(tmp_path), "x") + [
        "train.steps=4",
        f"train.deepspeed=zero{stage}",
        "checkpoint.every=1",
        "checkpoint.keep_last=1",
        "data.workers=1",
        "model.overrides.vision.block.drop_path=0.1",
    ]
    runs = [
        [QUICK, *base, "name=full"],
        [QUICK, *base, "name=cut", "train.stop_at=2"],
        [QUICK, *base, "name=cut"],
    ]
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    res = run([*torchrun, str(DRIVER), json.dumps(runs)], timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    full = load_file(str(export_run(tmp_path / "full") / "model.safetensors"))
    cut = load_file(str(export_run(tmp_path / "cut") / "model.safetensors"))
    assert full.keys() == cut.keys()
    assert all(torch.equal(full[k], cut[k]) for k in full)
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")
    # keep_last=1 leaves one checkpoint
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").glob("step_*")] == ["step_00000004"]


ABORT = "terminate called without an active exception"


def _tiny_cli(demo: str, out: str, name: str) -> list[str]:
    return [QUICK, *tiny_overrides(demo, out, name), "train.steps=2", "checkpoint.every=0"]


def test_launchers_agree(demo_data: str, tmp_path: Path) -> None:
    """`deepspeed --num_gpus 2 --module mmssl.train` and a simulated 2-node launch (two
    `torchrun --nnodes 2 --node_rank {0,1}` on this machine, one rank each) run the same
    2-rank job: identical losses, a checkpoint, world size 2 in the summary."""
    out = str(tmp_path)

    def launch_ds() -> tuple[str, subprocess.CompletedProcess]:
        port = str(free_port())
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port]
        cmd += ["--module", "mmssl.train", *_tiny_cli(demo_data, out, "ds")]
        return port, run(cmd, timeout=300)

    ds_port, ds = launch_ds()
    if ds.returncode and ABORT in ds.stderr:  # the rare worker abort (see below): once more
        shutil.rmtree(tmp_path / "ds", ignore_errors=True)
        ds_port, ds = launch_ds()
    assert ds.returncode == 0, ds.stdout[-2000:] + ds.stderr[-3000:]
    # the launcher's ranks share DeepSpeed's CPU all-reduce workspace: nothing stays behind
    assert not [
        f for f in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*") if ds_port in f.name
    ]
    codes, errs = _two_nodes(demo_data, out)
    if any("exitcode: -6" in e for e in errs):
        # now and then a worker aborts, within seconds of starting or at its exit (ABORT,
        # SIGABRT): 2 of 24 deepspeed launches under load, 0 of 48 idle or under a CPU hog;
        # not diagnosed (see the session 8 and 10 notes).  One fresh relaunch; a second
        # abort, or any other failure, fails the test
        shutil.rmtree(tmp_path / "nodes", ignore_errors=True)
        codes, errs = _two_nodes(demo_data, out)
    for code, err in zip(codes, errs):
        assert code == 0, err[-3000:]
    for name in ("ds", "nodes"):
        summary = (tmp_path / name / "summary.md").read_text()
        assert "- world_size: 2" in summary
        assert (tmp_path / name / "checkpoints" / "step_00000002").is_dir()
    assert losses(tmp_path / "ds") == losses(tmp_path / "nodes")


def _two_nodes(demo_data: str, out: str) -> tuple[list[int], list[str]]:
    """A simulated 2-node launch: two `torchrun --nnodes 2` on this machine, one rank each,
    writing run `nodes`; their exit codes and stderr."""
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [
                str(BIN / "torchrun"),
                "--nnodes",
                "2",
                "--node_rank",
                str(node),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                "-m",
                "mmssl.train",
                *_tiny_cli(demo_data, out, "nodes"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        for node in (0, 1)
    ]
    try:
        # torchrun's agents meet at an exit barrier that waits up to 300 s; on rare runs the
        # node-0 agent (the store host) waits it out after both workers have finished
        # (pytorch/pytorch#69520) and then exits 0, so allow that wait plus the job
        results = [p.communicate(timeout=420) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    return [p.returncode for p in nodes], [err for _, err in results]


def _shm_job() -> tuple[list[str], list[float]]:
    """Start DeepSpeed as its launcher would on one machine (LOCAL_SIZE = world size), then
    list this run's shared-memory files and all-reduce through the shm workspace."""
    import os

    import deepspeed.comm as dc

    from mmssl import distributed
    from mmssl.train.engine import init_distributed

    os.environ["LOCAL_SIZE"] = str(distributed.world_size())
    init_distributed()
    distributed.barrier()  # every rank is past its own clean-up
    port = os.environ["MASTER_PORT"]
    left = sorted(
        f
        for f in os.listdir("/dev/shm")
        if f.startswith("deepspeed_allreduce_buffer_") and f.split("_")[-2] == port
    )
    x = torch.full((4096,), float(distributed.rank() + 1))
    dc.inference_all_reduce(x)  # DeepSpeed's shm all-reduce: the mappings must outlive the names
    return left, x[:2].tolist()


def test_cpu_allreduce_workspace_leaves_no_shm_file() -> None:
    """DeepSpeed's CPU backend creates a 69 MB /dev/shm file per rank and never unlinks it;
    init_distributed removes the names once every rank has mapped them, and the shm
    all-reduce still sums (1 + 2 = 3 on 2 ranks).  The ranks may JIT-build DeepSpeed's shm
    op first (a fresh environment): a loaded machine took over 120 s for that once."""
    for left, head in run_distributed(_shm_job, 2, timeout=300.0):
        assert left == []
        assert head == [3.0, 3.0]


def test_a_launch_environment_given_in_part(tmp_path):
    """RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set by hand, without LOCAL_RANK: DeepSpeed
    then tried MPI discovery and the run died on a missing mpi4py.  One process is completed
    as a bare run is; for more, the missing names are said."""
    from train_helpers import synthetic_recipe

    recipe = synthetic_recipe(tmp_path, "partial", 2)
    port = str(free_port())
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    proc = run([sys.executable, "-m", "mmssl.train", str(recipe)], **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(losses(tmp_path / "partial")) == 2
    proc = run(
        [sys.executable, "-m", "mmssl.train", str(recipe), "train.global_batch_size=8"],
        **{**env, "RANK": "1", "WORLD_SIZE": "2"},
    )
    assert proc.returncode != 0
    assert "RANK is set but LOCAL_RANK not" in proc.stderr + proc.stdout
