"""Files read together (a tokenizer and its meta, an evaluation's results and summary) are
replaced together: a failed write names its file and leaves the old ones as they were, and a
kill among the renames never leaves a new file beside an old one (`replace_together`)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from mmssl import atomic
from mmssl.atomic import replace_together
from mmssl.eval.report import write_report
from mmssl.tokenizer import META_FILE, get_tokenizer


def _text(value: str):
    return lambda tmp: tmp.write_text(value)


def _interrupt_second_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill after the first of the renames."""
    done, real = [], os.replace

    def replace(src, dst):
        if done:
            raise KeyboardInterrupt
        done.append(dst)
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)


def test_replace_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, index = tmp_path / "data", tmp_path / "index"
    replace_together([(data, _text("d1")), (index, _text("i1"))])
    assert (data.read_text(), index.read_text()) == ("d1", "i1")

    def full(tmp: Path) -> None:
        tmp.write_text("cut")
        raise OSError(27, "File too large")

    with pytest.raises(OSError, match=r"File too large; nothing replaced: '.*index'"):
        replace_together([(data, _text("d2")), (index, full)])
    assert (data.read_text(), index.read_text()) == ("d1", "i1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "index"]  # no temporaries
    _interrupt_second_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        replace_together([(data, _text("d3")), (index, _text("i3"))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # the index gone, not old
    assert data.read_text() == "d3"


def _train_tokenizer(out: Path, corpus: Path, *more: str, limit: int | None = None):
    """`mmssl tokenizer train` in a process whose files may grow to `limit` bytes (a full
    disk alike: Python ignores SIGXFSZ, so a write past it fails with EFBIG)."""

    def limited() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code = "import sys; from mmssl.tokenizer.train import main; sys.exit(main(sys.argv[1:]))"
    argv = ["train", "--out", str(out), "--quiet", "--vocab-size", "300", *more, str(corpus)]
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        preexec_fn=limited,
        timeout=300,
    )


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_tokenizer_train_that_cannot_write_leaves_no_cut_file(tmp_path: Path, kind: str) -> None:
    """A file size limit left a cut tokenizer file that blocked the rerun ("already holds a
    tokenizer"), with an error naming no file; with --overwrite it destroyed the tokenizer
    a run had pinned (its sha256 then differed)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    out = tmp_path / "tok"
    res = _train_tokenizer(out, corpus, "--kind", kind, limit=2000)
    artifact = "tokenizer.json" if kind == "bpe" else "tokenizer.model"
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"File too large; nothing replaced: '{out / artifact}'" in res.stderr
    assert not out.exists() or not any(out.iterdir())
    assert _train_tokenizer(out, corpus, "--kind", kind).returncode == 0  # the rerun
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    sha = get_tokenizer(str(out)).sha256
    res = _train_tokenizer(out, corpus, "--kind", kind, "--overwrite", "--seed", "1", limit=2000)
    assert res.returncode == 2 and "nothing replaced" in res.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert get_tokenizer(str(out)).sha256 == sha


def test_tokenizer_meta_is_written_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between its two renames, a retraining left the new file beside the old meta."""
    from mmssl.tokenizer.train import Corpus, train_bpe

    corpus = Corpus(["the quick brown fox jumps over the lazy dog"] * 50, "tiny")
    train_bpe(corpus, tmp_path, vocab_size=300, show_progress=False)
    _interrupt_second_rename(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_bpe(corpus, tmp_path, vocab_size=301, show_progress=False, overwrite=True)
    assert not (tmp_path / META_FILE).exists()


def _report(out: Path, limit: int) -> dict:
    return write_report(out, "zeroshot", {"top1": 0.5}, model="m", data={"limit": limit})


def test_an_eval_report_interrupted_is_never_half_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill between results.json and summary.md left one report's results beside the other's
    summary."""
    _report(tmp_path, 100)
    with monkeypatch.context() as m:
        _interrupt_second_rename(m)
        with pytest.raises(KeyboardInterrupt):
            _report(tmp_path, 200)
    assert json.loads((tmp_path / "results.json").read_text())["data"] == {"limit": 200}
    assert not (tmp_path / "summary.md").exists()
    _report(tmp_path, 300)  # the rerun takes the results.json for its own and completes
    assert '"limit": 300' in (tmp_path / "summary.md").read_text()


def test_a_target_under_a_file_names_the_target(tmp_path: Path) -> None:
    """The clean-up's own error (unlinking a temporary under a file) hid the one naming the
    target."""
    (tmp_path / "f").write_text("a file")
    with pytest.raises(NotADirectoryError, match=r"nothing replaced: '.*f/x'"):
        replace_together([(tmp_path / "f" / "x", "text")])
