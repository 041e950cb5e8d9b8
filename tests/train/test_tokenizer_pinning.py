"""A run pins its tokenizer when it starts: the metadata (with the sha256 of its file) goes
into every checkpoint's run record.  The export records that one, whatever the file at the
path has become, and a resume refuses another.  A relative `data.tokenizer` is found from
the working directory, else from the recipe's, by training as by the export."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from mmssl.train.checkpoint import RUN_RECORD


def _train(args: list[str]) -> dict:
    from mmssl.train.loop import train
    from mmssl.train.recipe import load_recipe, validate

    recipe = load_recipe(args[0], args[1:])
    return train(recipe, validate(recipe))


def test_a_run_pins_its_tokenizer_for_its_export_and_its_resume(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> None:
    from mmssl.tokenizer import DEFAULT_DIR, META_FILE, get_tokenizer
    from mmssl.tokenizer.base import sha256_file
    from mmssl.train.cli import main
    from mmssl.train.export import export_run

    proj = tmp_path / "proj"
    shutil.copytree(DEFAULT_DIR, proj / "mytok")
    recipe = proj / "r.yaml"
    recipe.write_text(
        "name: pin\n"
        f"out_dir: {tmp_path / 'runs'}\n"
        "model: {name: test_tiny_clip, overrides: {text: {vocab_size: 8192}}}\n"
        "data: {tokenizer: mytok, sources: {train: {urls: synthetic}}}\n"
        "train: {steps: 2, global_batch_size: 4, micro_batch_size: 4}\n"
        "logging: {every: 1, tensorboard: false, progress: false}\n"
    )
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # mytok lies beside the recipe, not here
    _train([str(recipe), "train.stop_at=1"])
    run = tmp_path / "runs" / "pin"
    tok_dir = str((proj / "mytok").resolve())
    trained = get_tokenizer(tok_dir).sha256
    pinned = json.loads((run / "checkpoints" / "step_00000001" / RUN_RECORD).read_text())
    assert (pinned["tokenizer"]["name"], pinned["tokenizer"]["sha256"]) == (tok_dir, trained)

    # retrained in place: other bytes, and the metadata file that vouches for them
    tok_file, meta_file = proj / "mytok" / "tokenizer.json", proj / "mytok" / META_FILE
    tok_file.write_text(tok_file.read_text() + "\n")
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "sha256": sha256_file(tok_file)}))
    assert get_tokenizer(tok_dir).sha256 != trained
    with caplog.at_level(logging.WARNING, logger="mmssl.train"):
        out = export_run(run)
    assert json.loads((out / "config.json").read_text())["tokenizer"]["sha256"] == trained
    assert f"the tokenizer {tok_dir} is another (sha256 " in caplog.text

    capsys.readouterr()
    assert main([str(recipe), "checkpoint.resume=auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"mmssl train: error: data.tokenizer {tok_dir!r} has sha256 "), err
    assert f"(sha256 {trained}); a resume keeps the tokenizer" in err


def test_an_export_carries_its_tokenizer_to_a_machine_without_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export copies the run's tokenizer beside the weights, so that it evaluates after
    the file the run named is gone (another machine, a deleted project folder); a re-export
    then keeps that copy, and an export of a run on the default tokenizer holds no other."""
    from mmssl.eval.loading import load_model
    from mmssl.tokenizer import DEFAULT_DIR, META_FILE, get_tokenizer
    from mmssl.tokenizer.base import sha256_file
    from mmssl.train.export import export_run

    tok_dir = tmp_path / "proj" / "mytok"
    shutil.copytree(DEFAULT_DIR, tok_dir)
    # other bytes than the default's (the same ids), so only this file's copy matches
    tok_file, meta_file = tok_dir / "tokenizer.json", tok_dir / META_FILE
    tok_file.write_text(tok_file.read_text() + "\n")
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "sha256": sha256_file(tok_file)}))
    trained = get_tokenizer(tok_dir)
    assert trained.sha256 != get_tokenizer("default").sha256
    probe = ["a red seven", "the digit 3 in blue"]
    want_ids = trained.batch_encode(probe, 16)[0]

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: carry\n"
        f"out_dir: {tmp_path / 'runs'}\n"
        "model: {name: test_tiny_clip, overrides: {text: {vocab_size: 8192}}}\n"
        f"data: {{tokenizer: {tok_dir}, sources: {{train: {{urls: synthetic}}}}}}\n"
        "train: {steps: 1, global_batch_size: 4, micro_batch_size: 4}\n"
        "logging: {every: 1, tensorboard: false, progress: false}\n"
    )
    monkeypatch.chdir(tmp_path)
    _train([str(recipe)])
    run = tmp_path / "runs" / "carry"
    out = export_run(run)
    shutil.rmtree(tmp_path / "proj")  # the file the run named is gone
    moved = shutil.copytree(out, tmp_path / "elsewhere" / "model")
    for model_dir in (out, moved):
        tok = load_model(model_dir).tokenizer()
        assert tok.sha256 == trained.sha256 and tok.path.parent == model_dir
        assert tok.batch_encode(probe, 16)[0].equal(want_ids)
        kept = json.loads((model_dir / META_FILE).read_text())
        assert kept["corpus"] == meta["corpus"]  # the source meta's provenance is kept

    assert export_run(run) == out  # re-exported without the file: its copy stays
    assert load_model(out).tokenizer().sha256 == trained.sha256

    # the same folder now exports a run on the default tokenizer: no copy of mytok is left
    recipe.write_text(recipe.read_text().replace(f"tokenizer: {tok_dir}", "tokenizer: default"))
    shutil.rmtree(run)
    _train([str(recipe)])
    export_run(run)
    assert load_model(out).tokenizer().sha256 == get_tokenizer("default").sha256


def test_an_export_deletes_no_tokenizer_file_it_did_not_write(tmp_path: Path) -> None:
    """Exported into the folder of the run's own tokenizer.json, beside another tokenizer
    file, the export deleted that tokenizer.json (the folder did not load as one tokenizer,
    so its files were taken for a stale copy) and copied nothing.  Now the run's file stays
    and a meta names it; files no export wrote stay too, also when nothing is copied."""
    from mmssl.tokenizer import DEFAULT_DIR, META_FILE, get_tokenizer
    from mmssl.train.export_records import save_tokenizer_copy
    from mmssl.train.streams import tokenizer_record

    folder = tmp_path / "tokx"
    folder.mkdir()
    shutil.copy(DEFAULT_DIR / "tokenizer.json", folder / "tokenizer.json")
    (folder / "other.model").write_bytes(b"someone else's sentencepiece model")
    before = (folder / "tokenizer.json").read_bytes()
    record = tokenizer_record(str(folder / "tokenizer.json"))
    assert record is not None
    save_tokenizer_copy(folder, record)
    assert (folder / "tokenizer.json").read_bytes() == before
    assert (folder / "other.model").read_bytes() == b"someone else's sentencepiece model"
    assert json.loads((folder / META_FILE).read_text())["artifact"] == "tokenizer.json"
    assert get_tokenizer(folder).sha256 == record["sha256"]

    # the run's tokenizer gone: a user's tokenizer.model in the export folder is no copy of it
    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "tokenizer.model").write_bytes(b"a user's file")
    save_tokenizer_copy(dest, {**record, "name": str(tmp_path / "gone" / "tokenizer.json")})
    assert sorted(p.name for p in dest.iterdir()) == ["tokenizer.model"]
