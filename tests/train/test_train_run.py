"""Single-process training through the real DeepSpeed engine on CPU: a quickstart run on the
demo data, exact resume, export == live model, and every big recipe for 2 steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import PYTHON, RECIPES, losses, restored_env, run, tiny_overrides

from mmssl.train.engine import WarmupCosine
from mmssl.train.recipe import load_recipe

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning"),
]
QUICK = str(RECIPES / "quickstart.yaml")


@pytest.fixture(autouse=True)
def _restore_env():
    """In-process runs set the one-process group's variables; keep them out of later tests."""
    with restored_env():
        yield


def _train(args: list[str]) -> dict:
    from mmssl.train.loop import train
    from mmssl.train.recipe import load_recipe, validate

    recipe = load_recipe(args[0], args[1:])
    return train(recipe, validate(recipe))


def test_quickstart_tiny_trains_and_writes_run(demo_data: str, tmp_path: Path) -> None:
    """The quickstart recipe (tiny model): loss falls, checkpoints, summary, plot, eval."""
    from mmssl import load_encoder
    from mmssl.train.export import export_run

    args = [
        QUICK,
        *tiny_overrides(demo_data, str(tmp_path), "qs"),
        "train.steps=12",
        "optim.lr=3e-3",
        "checkpoint.every=5",
        "checkpoint.keep_last=2",
        "eval.every=6",
        "eval.batches=1",
        "logging.tensorboard=true",
    ]
    out = _train(args)
    run_dir = tmp_path / "qs"
    curve = losses(run_dir)
    assert len(curve) == 12
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.1, curve
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert tags == ["step_00000010", "step_00000012"]
    for name in ("recipe.yaml", "summary.md", "loss.png", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").iterdir())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "eval/loss" in rows[5] and "eval/loss/clip" in rows[11]
    # each row logs the LR its step applied: warmup 2 of 12 steps, then cosine to 5%
    schedule = WarmupCosine(2, 12, 0.05, True)
    assert [r["lr"] for r in rows] == pytest.approx([3e-3 * schedule(i) for i in range(12)])
    summary = (run_dir / "summary.md").read_text()
    assert "samples/s" in summary and "skipped bad samples: 0" in summary

    # export -> load_encoder gives the live model's features, exactly
    live = out["engine"].module.model.eval()
    enc = load_encoder(str(export_run(run_dir)), "vision")
    text = load_encoder(str(run_dir / "export"), "text")
    images = torch.rand(4, 3, 32, 32)
    ids = torch.randint(3, 8192, (4, 16))
    with torch.no_grad():
        assert torch.equal(
            enc.forward_features(images)["pooled"], live.forward_features(images)["pooled"]
        )
        assert torch.equal(enc.encode(images), live.encode_image(images))
        assert torch.equal(text.encode(ids), live.encode_text(ids))
    cfg = json.loads((run_dir / "export" / "config.json").read_text())
    assert cfg["descriptor"]["version"] == "v1" and cfg["checkpoint"] == "step_00000012"


def test_exact_resume_single_process(demo_data: str, tmp_path: Path) -> None:
    """Stopped at step 3 and resumed (loader worker, drop_path RNG), a run ends bitwise equal to an
    uninterrupted one of 6 steps.  The logged rows are identical too, with a logging interval
    (4) that the stop cuts: the checkpoint carries the interval's sums, so the resumed run's
    row at step 4 averages steps 1-4 as the uninterrupted one's does."""
    from mmssl.train.export import export_run

    base = [
        QUICK,
        *tiny_overrides(demo_data, str(tmp_path), "x"),
        "train.steps=6",
        "data.workers=1",
        "checkpoint.every=0",
        "logging.every=4",
        "model.overrides.vision.block.drop_path=0.1",
    ]
    _train([*base, "name=full"])
    _train([*base, "name=cut", "train.stop_at=3"])
    _train([*base, "name=cut", "checkpoint.resume=auto"])
    full = load_file(str(export_run(tmp_path / "full") / "model.safetensors"))
    cut = load_file(str(export_run(tmp_path / "cut") / "model.safetensors"))
    assert all(torch.equal(full[k], cut[k]) for k in full)

    def rows(name: str) -> dict[int, dict]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        timing = ("samples_per_s", "time")
        return {
            r["step"]: {k: v for k, v in r.items() if k not in timing}
            for r in map(json.loads, lines)
        }

    logged, resumed = rows("full"), rows("cut")
    assert sorted(logged) == [4, 6] and sorted(resumed) == [3, 4, 6]  # 3: the stop's own row
    assert {s: resumed[s] for s in logged} == logged


def _demo_sources(demo: str) -> dict[str, str]:
    return {
        "digits": f"{demo}/digits/train-{{000000..000014}}.tar",
        "text": f"{demo}/text/train-{{000000..000008}}.tar",
    }


def _big_recipe_overrides(name: str, demo: str, out: str) -> list[str]:
    """Tiny model + demo data + 2 steps on one CPU process, everything else as shipped."""
    src = _demo_sources(demo)
    common = [
        f"out_dir={out}",
        "train.steps=2",
        "schedule.warmup_steps=1",
        "train.global_batch_size=8",
        "train.micro_batch_size=8",
        "data.workers=0",
        "logging.progress=false",
        "logging.tensorboard=false",
        "data.image_size=32",
    ]
    clip_text = "text: {vocab_size: 49408, context_length: 16}"
    per = {
        "simclr_vit_s16": [
            "model.name=test_tiny_vit",
            f"data.sources.imagenet.urls={src['digits']}",
        ],
        "clip_vit_b16": [
            "model.name=test_tiny_clip",
            f"model.overrides={{{clip_text}}}",
            f"data.sources.laion.urls={src['digits']}",
            "data.context_length=16",
            "data.image_size=48",  # not the model's 32: evaluation must use the trained size
        ],
        "coca_vit_b16": [
            "model.name=test_tiny_coca",
            f"model.overrides={{{clip_text}}}",
            f"data.sources.laion.urls={src['digits']}",
            "data.context_length=16",
        ],
        "gpt_124m": [
            "model.name=test_tiny_gpt",
            "model.overrides={text: {vocab_size: 8192}}",
            f"data.sources.owt.urls={src['text']}",
            "data.context_length=32",
            "train.global_batch_size=16",
            "train.micro_batch_size=4",
        ],
        "joint": [
            f"data.sources.digits.urls={src['digits']}",
            f"data.sources.pydoc.urls={src['text']}",
            "train.deepspeed=zero3",
            "model.overrides.vision.dim=32",
            "model.overrides.text.dim=32",
            "model.overrides.vision.depth=2",
            "model.overrides.text.depth=2",
            "model.overrides.embed_dim=16",
        ],
    }
    return [*common, *per[name]]


@pytest.mark.parametrize(
    "name", ["simclr_vit_s16", "clip_vit_b16", "coca_vit_b16", "gpt_124m", "joint"]
)
def test_big_recipes_run_two_steps(name: str, demo_data: str, tmp_path: Path) -> None:
    """Each shipped recipe, scaled to a tiny model and the demo data, trains 2 steps with its
    own ZeRO stage, precision and activation checkpointing (joint under ZeRO-3)."""
    out = _train(
        [str(RECIPES / f"{name}.yaml"), *_big_recipe_overrides(name, demo_data, str(tmp_path))]
    )
    assert out["final_step"] == 2
    curve = losses(tmp_path / name)
    assert len(curve) == 1 and all(torch.isfinite(torch.tensor(curve)))
    if name == "clip_vit_b16":  # trained with CLIP's normalisation: evaluation applies it
        from mmssl.eval.loading import load_model

        recipe = load_recipe(str(RECIPES / f"{name}.yaml"))
        pre = load_model(str(tmp_path / name)).preprocess
        assert pre.mean == tuple(recipe.data.mean) and pre.std == tuple(recipe.data.std)
        assert pre.image_size == 48


def test_python_module_launch_and_export_cli(demo_data: str, tmp_path: Path) -> None:
    """`python -m mmssl.train` with no launcher, then `mmssl export`; `mmssl train` on bad input."""
    args = tiny_overrides(demo_data, str(tmp_path), "cli") + ["train.steps=2"]
    res = run([PYTHON, "-m", "mmssl.train", QUICK, *args])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "samples/s" in res.stdout
    res = run(
        [
            PYTHON,
            "-m",
            "mmssl.cli",
            "export",
            str(tmp_path / "cli"),
            "--out",
            str(tmp_path / "exported"),
        ]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    # bad input at process level: exit 2, one line, no traceback
    res = run([PYTHON, "-m", "mmssl.cli", "train", QUICK, *args, "train.micro_batch_size=7"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("mmssl train: error: ")


def test_other_objectives_zero3_synthetic(tmp_path: Path) -> None:
    """SigLIP (own scale and bias), AugSelf (descriptor head), SimCLR with a projector and
    label positives, on the generated `synthetic` source under ZeRO-3 with accumulation;
    the loss is finite and the task-owned heads are not exported."""
    from mmssl.train.export import export_run

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: other\n"
        f"out_dir: {tmp_path}\n"
        "model: {name: test_tiny_clip}\n"
        "data: {views: 2, sources: {train: {urls: synthetic}}}\n"
        "objectives:\n"
        "  siglip: {}\n"
        "  augself: {weight: 0.5, hidden: 16}\n"
        "  simclr: {projector_dim: 8, positives: label}\n"
        "train: {steps: 2, global_batch_size: 8, micro_batch_size: 4, deepspeed: zero3}\n"
        "logging: {every: 1, tensorboard: false, progress: false}\n"
    )
    linear = torch.nn.functional.linear
    out = _train([str(recipe)])
    assert torch.nn.functional.linear is linear  # ZeRO-3's swap does not outlive the run
    rows = [json.loads(x) for x in (tmp_path / "other" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and out["grad_accum"] == 2
    for key in ("loss/siglip", "loss/augself", "loss/simclr"):
        assert torch.isfinite(torch.tensor(rows[-1][key])), key
    weights = load_file(str(export_run(tmp_path / "other") / "model.safetensors"))
    assert not any(k.startswith(("heads.", "losses.")) for k in weights)


def test_eval_runs_at_its_own_steps_between_log_steps(tmp_path: Path) -> None:
    """eval.every need not be a multiple of logging.every: the held-out loss comes at every
    eval step, in a row of its own, and the training metrics of the rows around it still
    average whole logging intervals (as a run logging every step gives them)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"out_dir: {tmp_path}\n"
        "model: {name: test_tiny_clip}\n"
        "data: {sources: {train: {urls: synthetic}, test: {urls: synthetic}}}\n"
        "train: {steps: 4, global_batch_size: 4, micro_batch_size: 4}\n"
        "eval: {every: 3, batches: 1, sources: {train: test}}\n"
        "logging: {tensorboard: false, progress: false}\n"
    )

    def rows(name: str, every: int) -> dict[int, dict]:
        _train([str(recipe), f"name={name}", f"logging.every={every}"])
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines)}

    each, pairs = rows("each", 1), rows("pairs", 2)
    assert sorted(pairs) == [2, 3, 4]
    assert [s for s in pairs if "eval/loss" in pairs[s]] == [3]
    assert pairs[3]["eval/loss"] == each[3]["eval/loss"]
    for step in (2, 4):
        assert pairs[step]["loss"] == pytest.approx(
            (each[step - 1]["loss"] + each[step]["loss"]) / 2
        )


def test_bf16_zero0_export_holds_the_fp32_masters(demo_data: str, tmp_path: Path) -> None:
    """A bf16 ZeRO-0 run keeps fp32 master weights in DeepSpeed's optimizer, and the module in
    bf16.  The export holds the masters: equal to the live optimizer's, which are not the
    bf16 weights (they carry the updates' low bits)."""
    from mmssl.train.export import export_run

    args = tiny_overrides(demo_data, str(tmp_path), "bf") + [
        "train.steps=4",
        "train.deepspeed=zero0",
        "precision=bf16",
        "checkpoint.every=4",
    ]
    engine = _train([QUICK, *args])["engine"]
    opt = engine.optimizer  # each fp32 master sits at its bf16 parameter's place
    master = {
        id(p): m for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(g16, g32)
    }
    live = {
        name[len("model.") :]: (master[id(p)], p)
        for name, p in engine.module.named_parameters()
        if name.startswith("model.")
    }
    exported = load_file(str(export_run(tmp_path / "bf") / "model.safetensors"))
    assert live and set(live) <= set(exported)
    lost = 0
    for name, (fp32, bf16) in live.items():
        assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
        assert torch.equal(exported[name].reshape(fp32.shape), fp32), name  # 0-d kept (1,)
        lost += int(not torch.equal(fp32, bf16.float()))
    assert lost > len(live) // 2  # most masters differ from their bf16 rounding


def test_bf16_zero0_export_with_deepspeed_adam_holds_the_fp32_masters(tmp_path: Path) -> None:
    """With optim.impl=deepspeed (the default: DeepSpeed's FusedAdam) a bf16 ZeRO-0 run keeps
    its fp32 masters in FP16_Optimizer as one flat tensor per group, `fp32_groups_flat`, not
    as `fp32_groups`.  The export held the bf16 weights cast to fp32 then, every parameter
    off the masters; it now holds the masters, cut from the live flat tensors here."""
    from mmssl.train.export import export_run

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: fa\n"
        f"out_dir: {tmp_path}\n"
        "model: {name: test_tiny_clip}\n"
        "data: {sources: {train: {urls: synthetic}}}\n"
        "optim: {lr: 0.001, impl: deepspeed}\n"
        "precision: bf16\n"
        "train: {steps: 3, global_batch_size: 4, micro_batch_size: 4, deepspeed: zero0}\n"
        "logging: {every: 1, tensorboard: false, progress: false}\n"
    )
    engine = _train([str(recipe)])["engine"]
    opt = engine.optimizer
    assert not hasattr(opt, "fp32_groups")  # the fused optimizer's layout
    master = {}
    for params, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
        offset = 0
        for p in params:
            master[id(p)] = flat[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        assert offset == flat.numel()
    exported = load_file(str(export_run(tmp_path / "fa") / "model.safetensors"))
    live = [
        (n[len("model.") :], p)
        for n, p in engine.module.named_parameters()
        if n.startswith("model.")
    ]
    assert live and {n for n, _ in live} <= set(exported)
    lost = 0
    for name, p in live:
        fp32 = master[id(p)]
        assert torch.equal(exported[name].reshape(fp32.shape), fp32), name
        lost += int(not torch.equal(fp32, p.float()))
    assert lost > len(live) // 2  # most masters differ from their bf16 rounding


def test_a_resume_that_changes_the_run_is_refused_before_anything_changes(
    demo_data: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rerunning a run name with a changed model, schedule, LR or ZeRO stage: one line, exit
    2, before DeepSpeed loads anything; recipe.yaml and the checkpoints stay as they were,
    so the run still exports.  A checkpoint folder holding a file its manifest does not list
    is not used: resume=auto falls back to the one before."""
    from mmssl.train.cli import main
    from mmssl.train.export import export_run

    args = [QUICK, *tiny_overrides(demo_data, str(tmp_path), "r"), "train.steps=4"]
    _train([*args, "checkpoint.every=2"])
    run_dir = tmp_path / "r"
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    for change, says in [
        ("train.steps=8", "train.steps is 8 but checkpoint"),
        ("optim.lr=0.002", "optim.lr is 0.002 but checkpoint"),
        ("model.overrides.vision.depth=3", "model.overrides.vision.depth is 3 but"),
        ("train.deepspeed=zero2", "was written at ZeRO stage 0, this run uses stage 2"),
    ]:
        assert main([*args, "train.deepspeed=zero0", change]) == 2, change
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # DeepSpeed's import may log a warning first
        assert "Traceback" not in err and last.startswith("mmssl train: error: "), err
        assert says in last, (change, last)
        after = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
        assert after == before, change
    assert (export_run(run_dir) / "model.safetensors").is_file()
    from mmssl.train.checkpoint import find_resume

    # a user's note in a checkpoint is not the checkpoint's: it was skipped as damaged, and
    # rerunning the finished run retrained its last step and deleted the folder with the note
    (run_dir / "checkpoints" / "step_00000004" / "NOTES.txt").write_text("mine\n")
    assert find_resume("auto", run_dir) == (run_dir / "checkpoints", "step_00000004")
    # a save's kind of file the manifest does not list: not this save's checkpoint
    (run_dir / "checkpoints" / "step_00000004" / "stray.pt").write_bytes(b"x")
    assert find_resume("auto", run_dir) == (run_dir / "checkpoints", "step_00000002")


def test_export_records_the_runs_tokenizer_and_eval_uses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run trained with `data.tokenizer: clip` exports that tokenizer's metadata and a copy
    of it, and evaluation loads CLIP's BPE for it, not the default tokenizer (which it used
    to, silently, as the export named no tokenizer).  A tokenizer directory given relative
    to the training's working directory is recorded by its absolute path."""
    import shutil

    from mmssl.eval.loading import load_model
    from mmssl.tokenizer import DEFAULT_DIR, get_tokenizer

    clip = get_tokenizer("clip")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: tok\n"
        f"out_dir: {tmp_path}\n"
        f"model: {{name: test_tiny_clip, overrides: {{text: {{vocab_size: {clip.vocab_size}}}}}}}\n"
        "data: {tokenizer: clip, sources: {train: {urls: synthetic}}}\n"
        "train: {steps: 1, global_batch_size: 4, micro_batch_size: 4}\n"
        "logging: {every: 1, tensorboard: false, progress: false}\n"
    )
    _train([str(recipe)])
    loaded = load_model(str(tmp_path / "tok"))
    assert loaded.config["tokenizer"]["sha256"] == clip.sha256
    tok = loaded.tokenizer()
    assert tok.kind == "clip" and tok.sha256 == clip.sha256
    assert tok.path.parent == tmp_path / "tok" / "export"  # the export's copy
    texts = ["a photo of a red 7", "two   spaces, Ünïcode"]
    assert tok.batch_encode(texts, 16)[0].equal(clip.batch_encode(texts, 16)[0])

    shutil.copytree(DEFAULT_DIR, tmp_path / "mytok")
    monkeypatch.chdir(tmp_path)
    _train(
        [
            str(recipe),
            "name=path",
            "data.tokenizer=mytok",
            "model.overrides={text: {vocab_size: 8192}}",
        ]
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = load_model(str(tmp_path / "path"))
    assert loaded.config["tokenizer"]["name"] == str((tmp_path / "mytok").resolve())
    assert loaded.tokenizer().sha256 == get_tokenizer(tmp_path / "mytok").sha256


def test_resume_with_other_data_workers_is_refused_before_loading(
    demo_data: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A changed `data.workers` is refused from the run record, before DeepSpeed loads the
    checkpoint, in one line naming the recipe key; the run directory is left as it was."""
    from mmssl.train import checkpoint
    from mmssl.train.cli import main

    base = [QUICK, *tiny_overrides(demo_data, str(tmp_path), "w"), "train.steps=2"]
    _train([*base, "data.workers=1", "train.stop_at=1"])
    before = (tmp_path / "w" / "metrics.jsonl").read_text()

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the checkpoint was loaded before the data.workers check")

    monkeypatch.setattr(checkpoint, "load", no_load)
    capsys.readouterr()
    assert main([*base, "data.workers=2", "checkpoint.resume=auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mmssl train: error: data.workers is 2 but checkpoint"), err
    assert "num_workers" not in err[-1]
    assert (tmp_path / "w" / "metrics.jsonl").read_text() == before


def test_an_error_mid_run_leaves_no_data_worker_directories(demo_data: str, tmp_path: Path) -> None:
    """A run an error ended left one pymp-* directory in $TMPDIR per live data worker: the
    traceback kept the loaders alive until exit, when multiprocessing kills their workers
    before they clean up.  The loop now stops them itself, on every end."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    args = tiny_overrides(demo_data, str(tmp_path), "w") + ["train.steps=4", "data.workers=2"]
    script = (
        "import sys\n"
        "from mmssl.train import checkpoint\n"
        "def fail(*a, **k):\n"
        "    raise OSError(28, 'No space left on device')\n"
        "checkpoint.save = fail\n"
        "from mmssl.train.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    res = run([PYTHON, "-c", script, QUICK, *args, "checkpoint.every=2"], TMPDIR=str(tmp))
    assert res.returncode != 0 and "No space left on device" in res.stderr, res.stderr[-3000:]
    assert "(failed)" in (tmp_path / "w" / "summary.md").read_text()
    assert not list(tmp.glob("pymp-*")), list(tmp.iterdir())
