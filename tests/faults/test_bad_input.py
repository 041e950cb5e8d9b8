"""Bad configs and CLI input, generated with hypothesis: unknown keys, wrong types, negative
sizes, empty lists, huge values.  Every CLI (train, export, eval TASK, features, demo-data)
exits 2, prints exactly one line naming the key, no traceback, and leaves no file behind.
The CLIs run in-process through their `main(argv)`; a few cases run as real processes."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from train_helpers import clean_env

from mmssl.train.recipe import Recipe

FULL_EXAMPLES = 200
CI_EXAMPLES = 25
SETTINGS = settings(
    max_examples=FULL_EXAMPLES if __import__("fault_helpers").FULL else CI_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
BASE = {
    "name": "bad",
    "model": {"name": "test_tiny_clip"},
    "data": {"sources": {"train": {"urls": "synthetic"}}},
    "train": {"steps": 1, "global_batch_size": 4, "micro_batch_size": 4},
    "logging": {"every": 1, "tensorboard": False, "progress": False},
}
# one existing entry of each mapping of sections, for the dotted paths below it
MAP_KEYS = {"sources": "train", "objectives": "clip"}
MODEL_INTS = [
    "model.overrides.vision.dim",
    "model.overrides.vision.depth",
    "model.overrides.vision.num_heads",
    "model.overrides.vision.patch_size",
    "model.overrides.vision.image_size",
    "model.overrides.text.dim",
    "model.overrides.text.vocab_size",
    "model.overrides.text.context_length",
    "model.overrides.embed_dim",
]


def _leaves(
    cls: type, prefix: str = ""
) -> tuple[list[tuple[str, Any]], list[tuple[str, set[str]]]]:
    """(dotted key, type) of every leaf of the recipe schema and (section, field names)."""
    leaves: list[tuple[str, Any]] = []
    sections = [(prefix.rstrip("."), {f.name for f in dataclasses.fields(cls)})]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if f.name == "base_dir":
            continue
        if dataclasses.is_dataclass(tp):
            sub = _leaves(tp, f"{key}.")
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            sub = _leaves(typing.get_args(tp)[1], f"{key}.{MAP_KEYS[f.name]}.")
        else:
            leaves.append((key, tp))
            continue
        leaves += sub[0]
        sections += sub[1]
    return leaves, sections


LEAVES, SECTIONS = _leaves(Recipe)
NUMERIC = [k for k, tp in LEAVES if {int, float} & set(typing.get_args(tp) or (tp,))]
INTS = [k for k, tp in LEAVES if int in (typing.get_args(tp) or (tp,))] + MODEL_INTS
EMPTY = [
    "optim.betas",
    "data.mean",
    "data.std",
    "data.augment.scale",
    "data.augment.ratio",
    "data.augment.blur_sigma",
    "objectives",
]

_word = st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True)


def _wrong_value(tp: Any) -> st.SearchStrategy:
    kinds = set(typing.get_args(tp) or (tp,)) - {type(None)}
    options = [st.just({"a": 1}), st.lists(st.integers(), min_size=1, max_size=2)]
    if not kinds & {str} and typing.get_origin(tp) is not typing.Literal:
        options.append(
            _word.filter(
                lambda w: w not in ("null", "true", "false", "yes", "no", "on", "off", "y", "n")
            ).map(lambda w: f"x{w}")
        )
    if not kinds & {float, int, str}:
        options.append(st.integers(-5, 5))
    if int in kinds and float not in kinds:
        options.append(st.integers(0, 100).map(lambda n: n + 0.5))
    # a str field takes a boolean's text (`name=no` is "no"): only a Literal refuses it
    if typing.get_origin(tp) is typing.Literal:
        options.append(st.booleans() if bool not in kinds else st.just([1]))
    if typing.get_origin(tp) is list:
        return st.one_of(st.just({"a": 1}), st.just("xword"), st.just(True))
    if typing.get_origin(tp) is dict:  # {"a": 1} is a mapping: a wrong key, not a wrong type
        return st.one_of(st.just([1]), st.just("xword"), st.just(True))
    return st.one_of(options)


def _mutation(
    kinds: tuple[str, ...] = ("unknown", "wrong", "negative", "empty", "huge"),
) -> st.SearchStrategy:
    """(override string, the key the error must name).  Every numeric key of a recipe is a
    size, count, seed, rate or strength, so a negative value is wrong for each of them."""
    strategies = {
        "unknown": st.tuples(st.sampled_from(SECTIONS), _word)
        .filter(lambda t: t[1] not in t[0][1])
        .map(lambda t: (f"{t[0][0] + '.' if t[0][0] else ''}{t[1]}", 1)),
        "wrong": st.sampled_from(LEAVES).flatmap(
            lambda kt: _wrong_value(kt[1]).map(lambda v: (kt[0], v))
        ),
        "negative": st.tuples(st.sampled_from(NUMERIC + MODEL_INTS), st.integers(max_value=-1)),
        "model_negative": st.tuples(st.sampled_from(MODEL_INTS), st.integers(max_value=-1)),
        "empty": st.sampled_from(EMPTY).map(lambda k: (k, {} if k == "objectives" else [])),
        "huge": st.one_of(
            st.tuples(st.sampled_from(INTS), st.integers(min_value=2**63, max_value=2**90)),
            st.tuples(
                st.sampled_from(NUMERIC), st.sampled_from(["1e400", ".inf", "-.inf", ".nan"])
            ),
        ),
    }

    def render(kv: tuple[str, Any]) -> tuple[str, str]:
        key, value = kv
        special = isinstance(value, str) and value in ("1e400", ".inf", "-.inf", ".nan")
        return f"{key}={value if special else json.dumps(value)}", key

    return st.one_of([strategies[k] for k in kinds]).map(render)


def _call(module: str, argv: list[str]) -> tuple[int, list[str]]:
    """main(argv) in-process -> (exit code, non-empty stderr lines)."""
    from importlib import import_module

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = import_module(module).main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return int(code or 0), [x for x in err.getvalue().splitlines() if x.strip()]


def _files(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def _assert_one_line(code: int, lines: list[str], key: str, prog: str) -> None:
    assert code == 2, (code, lines)
    assert len(lines) == 1, lines
    assert lines[0].startswith(prog) and ": error: " in lines[0], lines
    assert "Traceback" not in lines[0], lines
    leaf = key if key.startswith("--") else key.split(".")[-1].split("[")[0]
    assert leaf in lines[0], (key, lines)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    (root / "recipe.yaml").write_text(yaml.safe_dump({**BASE, "out_dir": str(root / "runs")}))
    return root


@SETTINGS
@given(mutation=_mutation())
def test_train_rejects_bad_recipes(work: Path, mutation: tuple[str, str], in_process: None) -> None:
    override, key = mutation
    before = _files(work)
    code, lines = _call("mmssl.train.cli", [str(work / "recipe.yaml"), override])
    _assert_one_line(code, lines, key, "mmssl train")
    assert _files(work) == before, "a file was written"


@pytest.fixture(scope="module")
def exported_run(work: Path) -> Path:
    """A finished tiny run (made once) whose recipe the export test mutates."""
    import os

    from mmssl.train.loop import train
    from mmssl.train.recipe import load_recipe, validate

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.pop(k, None) for k in keys}
    recipe = load_recipe(work / "recipe.yaml", ["name=done"])
    train(recipe, validate(recipe))
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v
    return work / "runs" / "done"


@SETTINGS
@given(
    mutation=_mutation(("unknown", "wrong", "model_negative", "huge")),
    where=st.sampled_from(("record", "recipe.yaml")),
)
def test_export_rejects_bad_recipes(
    exported_run: Path, mutation: tuple[str, str], where: str, tmp_path_factory
) -> None:
    """A damaged recipe where export reads it: the run record saved with the checkpoint
    (edited with its manifest kept consistent), or RUN_DIR/recipe.yaml for a checkpoint
    without a record (saved before mmssl wrote them).  Export names the key and writes
    nothing.  (Export reads the schema and the model section: a negative train.steps or an
    empty optim.betas is no concern of its, so range mutations are limited to the model.)"""
    from mmssl.schema import apply_overrides
    from mmssl.train.checkpoint import RUN_RECORD, latest_tag, step_of, write_manifest

    override, key = mutation
    run = tmp_path_factory.mktemp("run") / "r"
    shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("export"))
    tag = latest_tag(run / "checkpoints")
    assert tag is not None
    folder = run / "checkpoints" / tag
    record = json.loads((folder / RUN_RECORD).read_text())
    if where == "record":
        record["recipe"] = apply_overrides(record["recipe"], [override])
        (folder / RUN_RECORD).write_text(json.dumps(record))
    else:
        (folder / RUN_RECORD).unlink()
        data = yaml.safe_load((run / "recipe.yaml").read_text())
        (run / "recipe.yaml").write_text(yaml.safe_dump(apply_overrides(data, [override])))
    write_manifest(folder, step_of(tag))
    before = _files(run.parent)
    code, lines = _call("mmssl.train.export", [str(run)])
    _assert_one_line(code, lines, key, "mmssl export")
    assert _files(run.parent) == before
    shutil.rmtree(run.parent)


# CLI options: (module, prog, base argv, {option: "int" | "float"}, required options)
_EVAL_NUM = {"--batch-size": "int", "--limit": "int"}
CLIS = [
    (
        "mmssl.eval.features",
        "mmssl features",
        ["--model", "M", "--data", "D", "--out", "OUT/f.safetensors"],
        _EVAL_NUM,
        ["--model", "--data", "--out"],
    ),
    ("mmssl.data.demo", "mmssl demo-data", ["OUT/demo"], {"--seed": "int", "--size": "int"}, []),
    (
        "mmssl.eval.cli",
        "mmssl eval zeroshot",
        ["zeroshot", "--model", "M", "--data", "D", "--classes", "digits", "--out", "OUT"],
        _EVAL_NUM,
        ["--data", "--classes"],
    ),
    (
        "mmssl.eval.cli",
        "mmssl eval retrieval",
        ["retrieval", "--model", "M", "--data", "D", "--out", "OUT"],
        _EVAL_NUM,
        ["--data"],
    ),
    (
        "mmssl.eval.cli",
        "mmssl eval fewshot",
        ["fewshot", "--model", "M", "--train", "A", "--test", "B", "--out", "OUT"],
        {
            **_EVAL_NUM,
            "--seeds": "int",
            "--knn-k": "int",
            "--weight-decay": "float",
            "--temperature": "float",
        },
        ["--train", "--test"],
    ),
    (
        "mmssl.eval.cli",
        "mmssl eval linear",
        ["linear", "--model", "M", "--train", "A", "--test", "B", "--out", "OUT"],
        {**_EVAL_NUM, "--val-fraction": "float", "--seed": "int"},
        ["--train", "--test"],
    ),
    (
        "mmssl.eval.cli",
        "mmssl eval finetune",
        ["finetune", "--model", "M", "--train", "A", "--test", "B", "--out", "OUT"],
        {
            **_EVAL_NUM,
            "--steps": "int",
            "--lr": "float",
            "--weight-decay": "float",
            "--train-batch-size": "int",
            "--seed": "int",
            "--num-classes": "int",
        },
        ["--train", "--test"],
    ),
    (
        "mmssl.eval.cli",
        "mmssl eval lm",
        ["lm", "--model", "M", "--out", "OUT"],
        {
            **_EVAL_NUM,
            "--max-new-tokens": "int",
            "--temperature": "float",
            "--top-k": "int",
            "--seed": "int",
        },
        [],
    ),
    ("mmssl.train.export", "mmssl export", ["RUN", "--out", "OUT"], {}, []),
    ("mmssl.train.cli", "mmssl train", ["RECIPE", "--validate"], {"--world-size": "int"}, []),
]


def _argv_mutation() -> st.SearchStrategy:
    """(cli, argv with one bad option, the option the error must name)."""

    def for_cli(cli: tuple) -> st.SearchStrategy:
        _, _, base, numeric, required = cli
        options = []
        if numeric:
            opt = st.sampled_from(sorted(numeric))
            bad = st.one_of(
                st.integers(max_value=-1).map(str),
                st.integers(min_value=2**63, max_value=2**80).map(str),
                _word.map(lambda w: f"x{w}"),
                st.sampled_from(["nan", "inf", "-inf", "1e400", "", "[]"]),
            )
            options.append(st.tuples(opt, bad).map(lambda ob: (base + [ob[0], ob[1]], ob[0])))
            options.append(opt.map(lambda o: (base + [o], o)))  # the value is missing
        options.append(_word.map(lambda w: (base + [f"--zz-{w}", "1"], f"--zz-{w}")))
        if required:

            def drop(o: str) -> tuple[list[str], str]:
                i = base.index(o)
                return base[:i] + base[i + 2 :], o

            options.append(st.sampled_from(required).map(drop))
        return st.one_of(options).map(lambda av: (cli, *av))

    return st.sampled_from(CLIS).flatmap(for_cli)


@SETTINGS
@given(case=_argv_mutation())
def test_every_cli_rejects_bad_options(work: Path, case: tuple, in_process: None) -> None:
    (module, prog, _, numeric, _), argv, option = case
    out = work / "cli-out"
    argv = [
        a.replace("OUT", str(out))
        .replace("RECIPE", str(work / "recipe.yaml"))
        .replace("RUN", str(work / "nowhere"))
        for a in argv
    ]
    before = _files(work)
    code, lines = _call(module, argv)
    _assert_one_line(code, lines, option, "mmssl eval" if module == "mmssl.eval.cli" else prog)
    assert _files(work) == before and not out.exists(), "a file was written"


@pytest.mark.slow
def test_bad_input_in_real_processes(work: Path) -> None:
    """The same contract through the console entry points, as separate processes."""
    # two processes: each pays torch's import, and the in-process tests cover every CLI
    cases = [
        (
            [sys.executable, "-m", "mmssl.train", str(work / "recipe.yaml"), "data.bogus=1"],
            "data.bogus",
        ),
        (
            [sys.executable, "-m", "mmssl.cli", "eval", "fewshot", "--model", "M", "--train", "A"]
            + ["--test", "B", "--seeds", "-2"],
            "--seeds",
        ),
    ]
    for cmd, key in cases:
        before = _files(work)
        res = subprocess.run(
            cmd, capture_output=True, text=True, env=clean_env(), cwd=str(work), timeout=120
        )
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert res.returncode == 2 and len(lines) == 1 and key in lines[0], (cmd, res.stderr)
        assert "Traceback" not in res.stderr and _files(work) == before


def test_demo_with_a_damaged_demo_json_is_one_line(tmp_path: Path, capsys) -> None:
    """`mmssl demo --out OUT` reuses OUT/data; a damaged demo.json there is named, kept, and
    nothing is trained."""
    from mmssl.demo import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo.json").write_text('{"dig')
    assert main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "demo.json is unreadable" in err[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data", "demo.json"]
