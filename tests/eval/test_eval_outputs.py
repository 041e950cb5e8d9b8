"""Evaluation inputs and outputs: damaged shards are an error, never a smaller test set, and
output files are never written over someone else's file and are readable by others."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
from eval_helpers import write_labelled_shards

from mmssl.data.errors import DataError
from mmssl.eval.cli import main as eval_main
from mmssl.eval.data import iter_raw, shard_urls
from mmssl.eval.features import main as features_main
from mmssl.eval.features_file import load_features


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _normal_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@pytest.fixture
def truncated_shards(tmp_path) -> str:
    """Three shards of 5 samples, the middle one cut short in its third sample."""
    write_labelled_shards(str(tmp_path), n=15, per_shard=5)
    shards = sorted(tmp_path.glob("test-*.tar"))
    assert len(shards) == 3
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    return str(tmp_path / "test-{000000..000002}.tar")


def test_truncated_shard_is_an_error_naming_it(truncated_shards):
    with pytest.raises(DataError, match=r"test-000001\.tar is damaged \(truncated_tar"):
        list(iter_raw(shard_urls(truncated_shards)))


def test_a_shard_never_closed_or_a_repeated_key_says_so(tmp_path):
    """A tar without its end-of-archive blocks (TarWriter never closed) and a repeated key
    are errors (the tasks score whole test sets), which say what they found: the repeat's
    said that "only its first 5 sample(s) could be read" after all 5 were read."""
    import io
    import tarfile

    def member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(tmp_path / "dup.tar", "w") as tar:
        for key in ("a", "b", "b", "c"):
            member(tar, f"{key}.txt", b"x")
    with pytest.raises(DataError, match=r"repeats a sample's key \(.*dup\.tar:b: key repeated"):
        list(iter_raw([str(tmp_path / "dup.tar")]))
    with tarfile.open(tmp_path / "ok.tar", "w") as tar:
        for key in ("a", "b", "c", "d"):
            member(tar, f"{key}.txt", b"x")
    data = (tmp_path / "ok.tar").read_bytes()
    end = 3 * 1024  # a, b, c: a header and one data block each
    (tmp_path / "open.tar").write_bytes(data[:end])
    with pytest.raises(
        DataError, match=re.escape("end-of-archive block (a tar writer not closed?)")
    ):
        list(iter_raw([str(tmp_path / "open.tar")]))
    (tmp_path / "cut.tar").write_bytes(data[: end - 512])  # mid-member: no such hint
    with pytest.raises(DataError, match="truncated_tar: member data cut short"):
        list(iter_raw([str(tmp_path / "cut.tar")]))
    dup = (tmp_path / "dup.tar").read_bytes()  # a, b, b, c: the repeat, then a cut in c
    (tmp_path / "both.tar").write_bytes(dup[: 4 * 1024 - 512])
    with pytest.raises(DataError, match="damaged \\(truncated_tar"):  # not only the repeat
        list(iter_raw([str(tmp_path / "both.tar")]))


def test_eval_on_a_truncated_shard_fails_instead_of_scoring_fewer(
    tmp_path, capsys, tiny_model_dir, truncated_shards
):
    out = tmp_path / "zs"
    argv = ["zeroshot", "--model", tiny_model_dir, "--data", truncated_shards, "--out", str(out)]
    assert eval_main([*argv, "--classes", "color", "--label-field", "label"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmssl eval: error: shard ") and "test-000001.tar" in err
    assert len(err.splitlines()) == 1
    assert not out.exists()  # no results.json for a smaller test set


def test_features_on_a_truncated_shard_fails(tmp_path, capsys, tiny_model_dir, truncated_shards):
    out = tmp_path / "f.safetensors"
    argv = ["--model", tiny_model_dir, "--data", truncated_shards, "--out", str(out)]
    assert features_main(argv) == 2
    assert "test-000001.tar is damaged" in capsys.readouterr().err
    assert not out.exists()


def test_features_never_overwrite_another_file(tmp_path, capsys, tiny_model_dir, test_shards):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    before = weights.read_bytes()
    note = tmp_path / "notes.txt"
    note.write_text("mine\n")
    for victim in (weights, note):
        argv = ["--model", str(model), "--data", test_shards, "--out", str(victim)]
        assert features_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("mmssl features: error: --out") and "not overwriting" in err
    assert weights.read_bytes() == before and note.read_text() == "mine\n"


def test_features_file_is_replaced_and_readable_by_others(
    tmp_path, capsys, tiny_model_dir, test_shards
):
    out = tmp_path / "f.safetensors"
    argv = ["--model", tiny_model_dir, "--data", test_shards, "--out", str(out), "--limit", "4"]
    assert features_main(argv) == 0
    assert _mode(out) == _normal_mode()  # safetensors alone would make it 0600
    assert load_features(out)["metadata"]["mmssl_features"] == "1"
    argv[-1] = "6"  # a second run may replace its own earlier file
    assert features_main(argv) == 0
    assert load_features(out)["features"].shape[0] == 6
    assert _mode(out) == _normal_mode()


def test_features_that_cannot_be_written_are_one_line(tmp_path, capsys, tiny_model_dir):
    write_labelled_shards(str(tmp_path), n=4, per_shard=4)
    (tmp_path / "file").write_text("a file, not a directory")
    out = tmp_path / "file" / "f.safetensors"
    argv = ["--model", tiny_model_dir, "--data", str(tmp_path / "test-000000.tar")]
    assert features_main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmssl features: error: cannot write"), err
    # a directory that exists but takes no file (safetensors' own I/O error was a traceback)
    assert features_main([*argv, "--out", "/proc/x.safetensors"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmssl features: error: cannot write"), err


def _with_preprocess(src: str, dest: Path, preprocess: dict) -> str:
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "preprocess": preprocess}))
    return str(dest)


def test_mean_without_std_in_the_config_is_an_error_naming_it(tmp_path, tiny_model_dir):
    # one of the two alone was skipped without a word: images went in unnormalised
    from mmssl.eval.data import Preprocess
    from mmssl.eval.loading import EvalError, load_model

    rgb = [0.5, 0.4, 0.3]
    for given, missing in (("mean", "std"), ("std", "mean")):
        model_dir = _with_preprocess(tiny_model_dir, tmp_path / given, {given: rgb})
        config = Path(model_dir) / "config.json"
        with pytest.raises(EvalError) as err:
            load_model(model_dir)
        assert str(err.value) == (
            f"{config}: preprocess.{given} needs preprocess.{missing} too "
            "(images are normalised with both)"
        )
        with pytest.raises(DataError, match="needs both mean and std"):
            Preprocess(32, **{given: tuple(rgb)})
    both = load_model(
        _with_preprocess(tiny_model_dir, tmp_path / "both", {"mean": rgb, "std": rgb})
    )
    assert both.preprocess == Preprocess(32, tuple(rgb), tuple(rgb))


def test_evaluation_uses_the_trained_image_size_and_rejects_a_bad_one(tmp_path, tiny_model_dir):
    from mmssl.eval.loading import EvalError, load_model

    assert load_model(tiny_model_dir).preprocess.image_size == 32  # the model's own
    trained = _with_preprocess(tiny_model_dir, tmp_path / "at48", {"image_size": 48})
    assert load_model(trained).preprocess.image_size == 48  # data.image_size of the run
    for i, bad in enumerate([12, 0, -8, "48", True]):  # patch size 8: refused at load
        path = _with_preprocess(tiny_model_dir, tmp_path / f"bad{i}", {"image_size": bad})
        with pytest.raises(EvalError, match="preprocess.image_size"):
            load_model(path)


def test_features_with_an_unbalanced_brace_pattern_is_one_line_naming_it(
    tmp_path, capsys, tiny_model_dir, test_shards
):
    # braceexpand's UnbalancedBracesError was a traceback (exit 1)
    bad = str(Path(test_shards).parent / "test-{000000..000003.tar")
    out = tmp_path / "f.safetensors"
    assert features_main(["--model", tiny_model_dir, "--data", bad, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 1 and err[0].startswith("mmssl features: error: "), captured.err
    assert repr(bad) in err[0] and "brace" in err[0].lower()
    assert not out.exists()


def test_features_that_cannot_be_written_leave_no_new_directory(
    tmp_path, capsys, tiny_model_dir, test_shards
):
    # the parents of --out are made before the file is written: a file that then cannot be
    # written (here a name longer than the file system allows) left them behind
    keep = tmp_path / "existing"
    keep.mkdir()
    out = keep / "new" / "a" / ("x" * 300 + ".safetensors")
    argv = ["--model", tiny_model_dir, "--data", test_shards, "--limit", "2", "--out", str(out)]
    assert features_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmssl features: error: cannot write"), err
    assert keep.is_dir() and list(keep.iterdir()) == []


def test_the_report_names_the_checkpoint_the_model_was_exported_from(
    tmp_path, tokenizer, test_shards
):
    """Reports of intermediate checkpoints could not be told apart: results.json named the
    model directory only (for a run directory, whatever its export held then)."""
    import mmssl
    from mmssl.eval.cli import run_task
    from mmssl.models.io import save_pretrained

    model = mmssl.create_model("test_tiny_clip", text={"vocab_size": tokenizer.vocab_size})
    extra = {"tokenizer": tokenizer.metadata, "checkpoint": "step_00000008"}
    export = save_pretrained(model, tmp_path / "exp", extra=extra)
    origin = {"checkpoint": "step_00000008", "manifest_sha256": "ab" * 32}
    (export / "exported_from.json").write_text(json.dumps(origin))
    out = tmp_path / "ev"
    run_task(["retrieval", "--model", str(export), "--data", test_shards, "--out", str(out)])
    doc = json.loads((out / "results.json").read_text())
    assert doc["checkpoint"] == {"tag": "step_00000008", "manifest_sha256": "ab" * 32}
    assert "checkpoint step_00000008" in (out / "summary.md").read_text()
    plain = save_pretrained(model, tmp_path / "plain", extra={"tokenizer": tokenizer.metadata})
    run_task(
        ["retrieval", "--model", str(plain), "--data", test_shards, "--out", str(tmp_path / "p")]
    )
    assert "checkpoint" not in json.loads((tmp_path / "p" / "results.json").read_text())
