"""Training: the default rebuilds byte-for-byte, both trainers load through get_tokenizer,
corpus readers (text, JSONL, WebDataset tar) and the CLI's bad-input handling."""

from __future__ import annotations

import errno
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mmssl.tokenizer import DEFAULT_DIR, META_FILE, get_tokenizer
from mmssl.tokenizer.train import Corpus, default_corpus, iter_corpus, main

CAPTIONS = [
    "a photo of the digit seven.",
    "a red handwritten 7.",
    "the number 3 in blue ink.",
    "something green and round.",
    "Unicode: naïve café, 日本語 😀",
]


def _small_corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:12]] + CAPTIONS * 20


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def inputs(tmp_path: Path) -> list[Path]:
    """The same small corpus split over a text file, a JSONL file and a WebDataset shard."""
    texts = _small_corpus()
    lines = [line for t in texts[:6] for line in t.split("\n") if line]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = [json.dumps({"text": t, "other": 1}) for t in texts[6:12]]
    (tmp_path / "b.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    members = {}
    for i, caption in enumerate(texts[12:]):
        members[f"shard/{i:06d}.txt"] = caption.encode()
        members[f"shard/{i:06d}.json"] = b'{"label": 1}'
        members[f"shard/{i:06d}.jpg"] = b"\xff\xd8 not text"
    _write_tar(tmp_path / "c.tar", members)
    return [tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.tar"]


def test_retrain_default_is_byte_identical(tmp_path: Path) -> None:
    shipped = json.loads((DEFAULT_DIR / META_FILE).read_text())
    corpus = default_corpus()
    list(corpus)  # hash the corpus of this Python's pydoc_data
    if corpus.summary()["sha256"] != shipped["corpus"]["sha256"]:
        pytest.skip(f"this Python's pydoc_data differs from the one the default was built on "
                    f"({shipped['corpus']['description']})")  # fmt: skip
    from mmssl.cli import main as mmssl_main  # through the `mmssl tokenizer` dispatcher

    assert mmssl_main(["tokenizer", "train", "--default", "--out", str(tmp_path), "--quiet"]) == 0
    for name in ("tokenizer.json", META_FILE):
        assert (tmp_path / name).read_bytes() == (DEFAULT_DIR / name).read_bytes(), name


def test_corpus_readers(inputs: list[Path]) -> None:
    texts = _small_corpus()
    expected_lines = [line for t in texts[:6] for line in t.split("\n") if line]
    got = list(iter_corpus(inputs))
    assert got == expected_lines + texts[6:12] + texts[12:]
    # a directory expands to its files in sorted order: a.txt, b.jsonl, c.tar
    assert list(iter_corpus([inputs[0].parent])) == got


def test_bpe_cli_trains_and_loads(inputs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["train", "--out", str(out), "--vocab-size", "600", "--special-token", "<|sep|>"]
    assert main([*args, "--quiet", *map(str, inputs)]) == 0
    meta = json.loads((out / META_FILE).read_text())
    assert meta["kind"] == "bpe" and meta["vocab_size"] == 600
    assert meta["corpus"]["num_texts"] == len(list(iter_corpus(inputs)))
    tok = get_tokenizer(str(out))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 600)
    assert tok._tok.token_to_id("<|sep|>") == 3  # extras follow pad, bos, eos
    for text in CAPTIONS + ["unseen: ÆØÅ ☃ \x00"]:
        assert tok.decode(tok.encode(text)) == text
    ids, mask = tok.batch_encode(CAPTIONS, 12)
    assert ids.shape == (5, 12) and bool(mask[:, 0].all())


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_trains_and_loads(
    inputs: list[Path], tmp_path: Path, model_type: str
) -> None:
    import sentencepiece as spm

    out = tmp_path / "spm"
    args = ["train", "--kind", "sentencepiece", "--model-type", model_type, "--vocab-size", "700"]
    assert main([*args, "--out", str(out), "--quiet", *map(str, inputs)]) == 0
    tok = get_tokenizer(str(out))
    assert tok.kind == "sentencepiece" and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    raw = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))  # the peer library
    for text in CAPTIONS:
        assert tok.encode(text) == raw.encode(text)
        assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text
    ids, mask = tok.batch_encode(CAPTIONS, 6)
    assert ids[:, 0].eq(1).all() and ids[:, -1].eq(2).all() and mask.all()
    bare = get_tokenizer(str(out / "tokenizer.model"))  # no meta: ids read from the model
    assert (bare.pad_id, bare.bos_id, bare.eos_id) == (0, 1, 2)
    assert bare.encode("a\ud800b") == tok.encode("a\ufffdb")  # lone surrogate: U+FFFD
    import pickle

    again = pickle.loads(pickle.dumps(tok))
    assert torch.equal(again.batch_encode(CAPTIONS, 8)[0], tok.batch_encode(CAPTIONS, 8)[0])


def test_sentencepiece_deterministic(inputs: list[Path], tmp_path: Path) -> None:
    for run in ("x", "y"):
        argv = ["train", "--kind", "sentencepiece", "--vocab-size", "500", "--out"]
        assert main([*argv, str(tmp_path / run), "--quiet", *map(str, inputs)]) == 0
    assert (tmp_path / "x" / "tokenizer.model").read_bytes() == (
        tmp_path / "y" / "tokenizer.model"
    ).read_bytes()


def test_corpus_counts_and_hashes() -> None:
    corpus = Corpus(["ab", "c"], "two texts")
    assert list(corpus) == ["ab", "c"]
    import hashlib

    assert corpus.summary() == {
        "description": "two texts",
        "num_texts": 2,
        "num_chars": 3,
        "sha256": hashlib.sha256(b"ab\0c\0").hexdigest(),
    }


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_lone_surrogates_in_jsonl_train_as_replacement_char(tmp_path: Path, kind: str) -> None:
    # JSON escapes can hold a lone surrogate (a cut emoji); both trainers crashed on it,
    # while encoding maps it to U+FFFD: train on that same text
    rows = [{"text": f"caption {i} of a cut emoji \ud83d here"} for i in range(30)]
    rows += [{"text": t} for t in CAPTIONS * 6]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    argv = ["train", "--kind", kind, "--vocab-size", "400", "--quiet", "--out"]
    assert main([*argv, str(tmp_path / "o"), str(tmp_path / "c.jsonl")]) == 0
    import hashlib

    scrubbed = [r["text"].replace("\ud83d", "\ufffd") for r in rows]
    meta = json.loads((tmp_path / "o" / META_FILE).read_text())
    data = b"".join(t.encode("utf-8") + b"\0" for t in scrubbed)
    assert meta["corpus"]["sha256"] == hashlib.sha256(data).hexdigest()
    tok = get_tokenizer(str(tmp_path / "o"))
    assert tok.encode("of a cut emoji \ud83d here") == tok.encode("of a cut emoji \ufffd here")


def test_sentencepiece_meta_records_extra_special_tokens(tmp_path: Path) -> None:
    import sentencepiece as spm

    from mmssl.tokenizer.train import train_sentencepiece

    extras = ["<|sep|>", "<|img|>"]
    corpus = Corpus(CAPTIONS * 20, "captions")
    meta = train_sentencepiece(
        corpus, tmp_path, vocab_size=300, extra_special_tokens=extras, show_progress=False
    )
    raw = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))  # the peer
    assert [raw.piece_to_id(t) for t in extras] == [4, 5] and raw.is_control(4)
    assert meta["extra_special_tokens"] == extras
    assert json.loads((tmp_path / META_FILE).read_text())["extra_special_tokens"] == extras


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "make, argv, message",
    [
        (None, ["train", "--out", "{tmp}/o", "{tmp}/missing.txt"], "input not found"),
        (None, ["train", "--out", "{tmp}/o"], "no inputs given"),
        (None, ["train", "{tmp}/x.txt"], "--out is required"),
        (None, ["train", "--default", "{tmp}/x.txt"], "--default takes only --out"),
        (None, ["train", "--default", "--vocab-size", "9"], "--default takes only --out"),
        (None, ["train", "--out", "{tmp}/o", "--kind", "sentencepiece", "--min-frequency", "3",
                "{tmp}/x.txt"], "--min-frequency applies to --kind bpe only"),
        (None, ["train", "--out", "{tmp}/o", "--model-type", "unigram", "{tmp}/x.txt"],
         "--kind sentencepiece only"),
        (None, ["train", "--out", "{tmp}/o", "--vocab-size", "0", "{tmp}/x.txt"], "--vocab-size must be >= 1"),
        (None, ["train", "--out", "{tmp}/o", "--vocab-size", "100", "{tmp}/x.txt"], "vocab_size must be >= 259"),
        (None, ["train", "--out", "{tmp}/o", "--bos", "<|pad|>", "{tmp}/x.txt"], "distinct"),
        (None, ["train", "--out", "{tmp}/o", "--kind", "sentencepiece", "--pad", "<|unk|>", "{tmp}/x.txt"],
         "must differ from the unknown token '<|unk|>'"),
        (None, ["train", "--out", "{tmp}/o", "--kind", "sentencepiece", "--special-token", "<|unk|>",
                "{tmp}/x.txt"], "must differ from the unknown token '<|unk|>'"),
        # a byte piece's name took that byte's id (a newline encoded as eos); U+2581 decoded
        # every space as the special token: both trained and exited 0
        (None, ["train", "--out", "{tmp}/o", "--kind", "sentencepiece", "--eos", "<0x0A>", "{tmp}/x.txt"],
         "special token '<0x0A>' is the name of a byte piece"),
        (None, ["train", "--out", "{tmp}/o", "--kind", "sentencepiece", "--special-token", "\u2581",
                "{tmp}/x.txt"], "holds U+2581, sentencepiece's space"),
        (None, ["train", "--out", "{tmp}/o", "--eos", "EOS", "{tmp}/x.txt"], "'EOS' is a single word"),
        ("bad.jsonl", ["train", "--out", "{tmp}/o", "{tmp}/bad.jsonl"], "bad.jsonl:4: invalid JSON"),
        ("nofield.jsonl", ["train", "--out", "{tmp}/o", "{tmp}/nofield.jsonl"], "nofield.jsonl:1: no field 'text'"),
        ("latin1.txt", ["train", "--out", "{tmp}/o", "{tmp}/latin1.txt"], "latin1.txt: not UTF-8"),
        ("broken.tar", ["train", "--out", "{tmp}/o", "{tmp}/broken.tar"], "broken.tar: cannot read tar"),
        ("binary.tar", ["train", "--out", "{tmp}/o", "{tmp}/binary.tar"], "binary.tar:k.txt: not UTF-8"),
        ("empty.txt", ["train", "--out", "{tmp}/o", "{tmp}/empty.txt"], "empty corpus"),
        (None, ["train", "--out", "{tmp}/o", "--kind", "sentencepiece", "--seed", "-5", "{tmp}/x.txt"],
         "--seed must be >= 0"),
        (None, ["train", "--out", "{tmp}/o", "--bos", "", "{tmp}/x.txt"], "--bos must not be empty"),
        (None, ["train", "--out", "{tmp}/o", "--pad", "", "{tmp}/x.txt"], "--pad must not be empty"),
        (None, ["train", "--out", "{tmp}/o", "--special-token", "", "{tmp}/x.txt"],
         "--special-token must not be empty"),
        (None, ["train", "--out", "{tmp}/o", "--tar-field", "", "{tmp}/x.txt"], "--tar-field must not be empty"),
        (None, ["oops"], "mmssl tokenizer: error: unknown subcommand 'oops'"),
        (None, ["train", "--kind", "wordpiece"], "invalid choice"),
    ],
)  # fmt: skip
def test_cli_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make, argv, message
) -> None:
    (tmp_path / "x.txt").write_text("some text\n")
    files = {
        "bad.jsonl": b'{"text": "ok"}\n\n\n{oops\n',  # its line number counts the blank lines
        "nofield.jsonl": b'{"caption": "x"}\n',
        "latin1.txt": "caf\xe9\n".encode("latin-1"),
        "empty.txt": b"\n\n",
        "broken.tar": b"this is not a tar archive" * 40,
    }
    if make == "binary.tar":
        _write_tar(tmp_path / make, {"k.txt": b"\xff\xfe\xfa"})
    elif make:
        (tmp_path / make).write_bytes(files[make])
    code, err = _run_cli([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o" / META_FILE).exists()


def test_directory_reads_only_corpus_files(
    inputs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a shard folder as `mmssl demo-data` writes it: shards plus a manifest.json
    folder = inputs[0].parent
    (folder / "manifest.json").write_text('{"num_samples": 3, "text": "not a caption"}\n')
    (folder / "notes.md").write_text("not training text\n")
    # the reference: the three corpus files named one by one
    expected = list(iter_corpus(inputs))
    assert list(iter_corpus([folder])) == expected
    out = tmp_path / "out"
    assert main(["train", "--out", str(out), "--vocab-size", "300", "--quiet", str(folder)]) == 0
    meta = json.loads((out / META_FILE).read_text())
    assert meta["corpus"]["num_texts"] == len(expected)
    err = capsys.readouterr().err
    assert "skipped 2 file(s)" in err and "manifest.json" in err and "notes.md" in err
    assert "skipped 2" in meta["corpus"]["description"]
    # a file named explicitly is still read, whatever its name
    assert list(iter_corpus([folder / "notes.md"])) == ["not training text"]


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"])
def test_compressed_shards_in_a_directory_are_corpus_files(tmp_path: Path, suffix: str) -> None:
    # the suffixes the data pipeline trains from are the ones a directory contributes
    mode = {".tar.gz": "gz", ".tgz": "gz", ".tar.bz2": "bz2", ".tar.xz": "xz"}[suffix]
    with tarfile.open(tmp_path / f"s{suffix}", f"w:{mode}") as tar:
        for key, text in (("000000", "a compressed caption"), ("000001", "another one")):
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    assert list(iter_corpus([tmp_path])) == ["a compressed caption", "another one"]


def test_directory_of_only_other_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "manifest.json").write_text("{}\n")
    code, err = _run_cli(["train", "--out", str(tmp_path / "o"), str(tmp_path)], capsys)
    assert code == 2 and "no input files" in err and "skipped 1" in err


@pytest.mark.parametrize("out", ["x.txt", "x.txt/sub"])
def test_out_is_a_file_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], out: str
) -> None:
    (tmp_path / "x.txt").write_text("some text\n")
    # training on this file would fail on its encoding: the --out error must come first
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    argv = ["train", "--out", str(tmp_path / out), str(tmp_path / "latin1.txt")]
    code, err = _run_cli(argv, capsys)
    assert code == 2 and "is not a directory" in err and "Traceback" not in err
    assert (tmp_path / "x.txt").read_text() == "some text\n"


def test_a_tokenizer_in_out_is_replaced_only_with_overwrite(
    inputs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mmssl.tokenizer.train import train_sentencepiece

    out = tmp_path / "out"
    train = ["train", "--out", str(out), "--quiet", "--vocab-size"]
    assert main([*train, "600", *map(str, inputs)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # training on this file would fail on its encoding: the refusal must come first
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    code, err = _run_cli([*train, "700", str(tmp_path / "latin1.txt")], capsys)
    assert code == 2 and "already holds a tokenizer" in err and "--overwrite" in err
    with pytest.raises(ValueError, match="already holds a tokenizer"):  # the function too
        train_sentencepiece(Corpus(["a b c"], "tiny"), out, vocab_size=300)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([*train, "700", "--overwrite", *map(str, inputs)]) == 0
    assert get_tokenizer(str(out)).vocab_size == 700
    # any file get_tokenizer(DIR) would load, such as a lone CLIP vocabulary or .model
    for name in ("bpe_simple_vocab_16e6.txt.gz", "mine.model"):
        other = tmp_path / name.split(".")[0]
        other.mkdir()
        (other / name).write_bytes(b"x")
        code, err = _run_cli(["train", "--out", str(other), "--quiet", str(inputs[0])], capsys)
        assert code == 2 and f"already holds a tokenizer ({name})" in err


@pytest.mark.parametrize("seed", [-1, 2**32, True])
def test_train_functions_check_seed(tmp_path: Path, seed: int) -> None:
    from mmssl.tokenizer.train import train_sentencepiece

    with pytest.raises(ValueError, match="seed must be an integer"):
        train_sentencepiece(Corpus(["a b c"], "tiny"), tmp_path / "o", seed=seed)


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
@pytest.mark.parametrize("name", ["latin1.txt", "bad.jsonl", "binary.tar"])
def test_corpus_errors_are_the_readers_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, name: str
) -> None:
    # sentencepiece wrapped a reader's error in a RuntimeError whose last line is a
    # traceback frame ("corpus.py(105): _iter_lines"): the file and the cause were lost
    (tmp_path / "x.txt").write_text("some text\n" * 50)
    bad = tmp_path / name
    if name == "binary.tar":
        _write_tar(bad, {"k.txt": b"\xff\xfe\xfa"})
    else:
        bad.write_bytes({"latin1.txt": b"caf\xe9\n", "bad.jsonl": b'{"text": "ok"}\n{oops\n'}[name])
    with pytest.raises(ValueError) as info:  # the reference: the reader alone
        list(iter_corpus([tmp_path / "x.txt", bad]))
    argv = ["train", "--kind", kind, "--vocab-size", "300", "--quiet", "--out"]
    code, err = _run_cli([*argv, str(tmp_path / "o"), str(tmp_path / "x.txt"), str(bad)], capsys)
    assert code == 2 and err == f"mmssl tokenizer train: error: {info.value}"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text", ["x" * 70_000 + "\n", "\n" + "é" * 40_000])
def test_sentencepiece_without_a_usable_line_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    # sentencepiece drops lines over 65,536 bytes (the second: 40,000 characters, 80,000
    # bytes), then failed with its internal "[!sentences_.empty()]"; the corpus is not empty
    (tmp_path / "x.txt").write_text(text, encoding="utf-8")
    argv = ["train", "--kind", "sentencepiece", "--vocab-size", "300", "--quiet", "--out"]
    code, err = _run_cli([*argv, str(tmp_path / "o"), str(tmp_path / "x.txt")], capsys)
    assert code == 2 and "no text to train on" in err and "65536 bytes" in err, err
    assert not (tmp_path / "o").exists()


def _refuse_mkdir(monkeypatch: pytest.MonkeyPatch, refused: Callable[[Path], bool]) -> None:
    """os.mkdir fails with EPERM where `refused`, as on /sys to root, who passes os.access
    (the tests may run as root)."""
    mkdir = os.mkdir

    def patched(path: str | Path, mode: int = 0o777) -> None:
        if refused(Path(path)):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        mkdir(path, mode)

    monkeypatch.setattr(os, "mkdir", patched)


@pytest.mark.parametrize("case", ["name too long", "not writable"])
def test_out_that_cannot_be_made_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    # both trained first, then died making --out with an OSError traceback
    (tmp_path / "x.txt").write_text("some text\n")
    # training on this file would fail on its encoding: the --out error must come first
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    out = tmp_path / ("a" * 256) / "o"
    message = f"{out.parent} has a name longer than 255 bytes"
    if case == "not writable":
        out = tmp_path / "ro" / "o"
        out.parent.mkdir()
        _refuse_mkdir(monkeypatch, lambda path: path.parent == out.parent)
        message = f"{out.parent} is not writable (Operation not permitted)"
    before = sorted(tmp_path.rglob("*"))
    code, err = _run_cli(["train", "--out", str(out), str(tmp_path / "latin1.txt")], capsys)
    assert code == 2 and err == f"mmssl tokenizer train: error: cannot write to {out}: {message}"
    assert sorted(tmp_path.rglob("*")) == before


def test_out_failing_after_training_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError making --out that the check did not foresee is one line, not a traceback."""
    (tmp_path / "x.txt").write_text("some text\n" * 50)
    out = tmp_path / "o"
    _refuse_mkdir(monkeypatch, lambda path: path == out)  # the check's trial directory passes
    argv = ["train", "--vocab-size", "300", "--quiet", "--out", str(out), str(tmp_path / "x.txt")]
    code, err = _run_cli(argv, capsys)
    assert (
        code == 2
        and err == f"mmssl tokenizer train: error: [Errno 1] Operation not permitted: '{out}'"
    )
    assert not out.exists()


@pytest.mark.parametrize("name", ["bad.txt", "bad.jsonl"])
def test_not_utf8_error_gives_file_offset_and_line(tmp_path: Path, name: str) -> None:
    # the text reader decodes in chunks and its error offset was into the chunk: a bad byte
    # 100,004 bytes into a file was reported "at byte 1700"
    head = "é" * 50_000 + "\n"  # 100,001 bytes but 50,001 characters: the offset counts bytes
    data = head.encode() + b"\n" + b"abc\xffdef\n"  # the empty line still counts as a line
    offset = data.index(b"\xff")
    bad = tmp_path / name
    bad.write_bytes(data)
    with pytest.raises(ValueError) as info:
        list(iter_corpus([bad]))
    assert str(info.value) == f"{bad}: not UTF-8 text (invalid start byte at byte {offset}, line 3)"


def test_sentencepiece_reports_dropped_long_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # sentencepiece skips lines over 65,536 bytes without a word; with other lines usable,
    # training went on and tokenizer_meta.json gave no sign that text was left out
    short = [line for t in _small_corpus() for line in t.split("\n") if line]
    edge = "ab " * 21_845 + "a"  # exactly 65,536 bytes: kept
    long = ["é" * 40_000, "w" * 70_000]  # 80,000 and 70,000 bytes: dropped
    (tmp_path / "mixed.txt").write_text("\n".join([long[0], edge, *short, long[1]]) + "\n")
    (tmp_path / "kept.txt").write_text("\n".join([edge, *short]) + "\n")
    argv = ["train", "--kind", "sentencepiece", "--vocab-size", "500", "--quiet", "--out"]
    for name in ("mixed", "kept"):
        assert main([*argv, str(tmp_path / name), str(tmp_path / f"{name}.txt")]) == 0
    err = capsys.readouterr().err
    assert "dropped 2 line(s) (110000 characters) longer than sentencepiece's 65536 bytes" in err
    corpus = json.loads((tmp_path / "mixed" / META_FILE).read_text())["corpus"]
    assert (corpus["dropped_long_lines"], corpus["dropped_long_chars"]) == (2, 110_000)
    kept = json.loads((tmp_path / "kept" / META_FILE).read_text())["corpus"]
    assert (kept["dropped_long_lines"], kept["dropped_long_chars"]) == (0, 0)
    # the reference: the same file without the long lines trains the same model
    assert (tmp_path / "mixed" / "tokenizer.model").read_bytes() == (
        tmp_path / "kept" / "tokenizer.model"
    ).read_bytes()


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_decode_drops_every_special_token_as_documented(tmp_path: Path, kind: str) -> None:
    # the docs said decode drops bos/eos/pad; it drops an extra special token too (a
    # sentencepiece control symbol has no text at all), and the docs now say so
    from mmssl.tokenizer import Tokenizer

    (tmp_path / "c.txt").write_text("\n".join(CAPTIONS * 20) + "\n")
    argv = ["train", "--kind", kind, "--vocab-size", "300", "--special-token", "<|sep|>"]
    assert main([*argv, "--quiet", "--out", str(tmp_path / "o"), str(tmp_path / "c.txt")]) == 0
    tok = get_tokenizer(str(tmp_path / "o"))
    sep = next(i for i in range(tok.vocab_size) if tok.id_to_token(i) == "<|sep|>")
    a, b = tok.encode("a red"), tok.encode("7.")
    # the reference: the same ids without the special ones
    assert tok.decode([tok.bos_id, *a, sep, tok.pad_id, *b, tok.eos_id]) == tok.decode(a + b)
    assert tok.decode([sep]) == ""
    readme = (Path(__file__).resolve().parents[1] / "tokenizer" / "README.md").read_text()
    assert "`decode` drops every special token" in " ".join(readme.split())
    assert "drops every special token" in " ".join((Tokenizer.decode.__doc__ or "").split())


def test_a_byte_order_mark_is_no_corpus_text(tmp_path: Path) -> None:
    # a Windows tool's text file or caption began with U+FEFF, which the tokenizer learned
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfhello world\nsecond line\n")
    with tarfile.open(tmp_path / "c.tar", "w") as tar:
        data = b"\xef\xbb\xbfa caption"
        info = tarfile.TarInfo("0001.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    got = list(iter_corpus([tmp_path / "a.txt", tmp_path / "c.tar"]))
    assert got == ["hello world", "second line", "a caption"]
