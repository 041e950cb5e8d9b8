"""The shipped default tokenizer, the Tokenizer interface, bad input and loading errors."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmssl.tokenizer as tokmod
from mmssl.tokenizer import DEFAULT_DIR, META_FILE, Tokenizer, get_tokenizer
from mmssl.tokenizer.base import sha256_file

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "a photo of the digit seven.",
    "a red handwritten 7.",
    "Hello, World!  Two  spaces, a\ttab and\na newline.",
    "naïve café, Straße, Ελληνικά, 日本語, 😀👍🏽👩‍👩‍👧",
    "def f(x):\n    return x ** 2  # comment",
    "<|bos|> and <|eos|> and <|pad|> are text here",
    "",
    " ",
    "\x00\x01\x1b[0m\x7f control",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return get_tokenizer()


class CharTokenizer(Tokenizer):
    """Toy backend with ids known by hand: 'a' -> 3, 'b' -> 4, ...; pad 0, bos 1, eos 2."""

    kind, name, path, sha256 = "toy", "toy", Path("toy"), "0" * 64
    vocab_size, pad_id, bos_id, eos_id = 29, 0, 1, 2

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [[ord(c) - ord("a") + 3 for c in t] for t in texts]

    def _decode_ids(self, ids: list[int]) -> str:
        return "".join(chr(i - 3 + ord("a")) for i in ids)


def test_default_round_trips(tok: Tokenizer) -> None:
    from pydoc_data.topics import topics

    from mmssl.data.captions import caption_corpus

    texts = TEXTS + caption_corpus()[::50] + [topics[k][:2000] for k in sorted(topics)[:10]]
    for text in texts:
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text


def test_default_identity(tok: Tokenizer) -> None:
    assert (tok.kind, tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == ("bpe", 8192, 0, 1, 2)
    assert tok.encode("") == [] and tok.encode("", add_bos=True, add_eos=True) == [1, 2]
    # special-token strings in text stay text: user data cannot forge an eos
    assert not set(tok.encode("<|bos|><|eos|><|pad|>")) & {0, 1, 2}
    # an in-domain caption is a few whole-word tokens, not bytes
    assert len(tok.encode("a photo of the digit seven.")) <= 7
    assert get_tokenizer("default") is tok and get_tokenizer(str(DEFAULT_DIR)).sha256 == tok.sha256


def test_batch_encode_hand_computed() -> None:
    toy = CharTokenizer()
    ids, mask = toy.batch_encode(["ab", "", "abcdef"], context_length=5)
    assert ids.tolist() == [[1, 3, 4, 2, 0], [1, 2, 0, 0, 0], [1, 3, 4, 5, 2]]
    assert mask.tolist() == [
        [True, True, True, True, False],
        [True, True, False, False, False],
        [True, True, True, True, True],
    ]
    ids, mask = toy.batch_encode(["abcdef", "a"], 3, add_bos=False, add_eos=False)
    assert ids.tolist() == [[3, 4, 5], [3, 0, 0]] and mask.sum(1).tolist() == [3, 1]
    ids, _ = toy.batch_encode(["abcdef"], 3, add_bos=False, add_eos=True)
    assert ids.tolist() == [[3, 4, 2]]
    ids, _ = toy.batch_encode(["abcdef"], 1)
    assert ids.tolist() == [[2]]  # eos survives even a context of one
    ids, mask = toy.batch_encode([], 4)
    assert ids.shape == (0, 4) and mask.shape == (0, 4)
    assert toy.decode([1, 3, 4, 2, 0]) == "ab"


def test_batch_encode_reads_an_iterable_once(tok: Tokenizer) -> None:
    # open_clip.tokenize takes any iterable; a generator checked and then encoded was
    # silently an empty (0, T) batch
    toy = CharTokenizer()
    ids, mask = toy.batch_encode((t.strip() for t in [" ab ", "c"]), 4)
    assert ids.tolist() == [[1, 3, 4, 2], [1, 5, 2, 0]] and mask.sum(1).tolist() == [4, 3]
    expected = tok.batch_encode(TEXTS, 16)
    for texts in (iter(TEXTS), (t for t in TEXTS), map(str, TEXTS), tuple(TEXTS)):
        ids, mask = tok.batch_encode(texts, 16)
        assert torch.equal(ids, expected[0]) and torch.equal(mask, expected[1])
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        tok.batch_encode(iter(["ok", 3]), 8)  # type: ignore[list-item]


def test_batch_encode_default_against_naive(tok: Tokenizer) -> None:
    texts = TEXTS + ["word " * 200]
    for context_length in (1, 2, 8, 77):
        ids, mask = tok.batch_encode(texts, context_length)
        assert ids.shape == mask.shape == (len(texts), context_length)
        assert ids.dtype == torch.int64 and mask.dtype == torch.bool
        for row, valid, text in zip(ids.tolist(), mask.tolist(), texts):
            full = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
            n = min(len(full), context_length)
            expected = full[: n - 1] + [tok.eos_id]
            assert row == expected + [tok.pad_id] * (context_length - n)
            assert valid == [True] * n + [False] * (context_length - n)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_property_decode_encode_is_identity(text: str) -> None:
    tok = get_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def _utf8_safe(text: str) -> str:
    """Reference for surrogate handling, written per code point: a high+low pair becomes
    the character it encodes, any other surrogate becomes U+FFFD."""
    out, i = [], 0
    while i < len(text):
        c = ord(text[i])
        nxt = ord(text[i + 1]) if i + 1 < len(text) else 0
        if 0xD800 <= c < 0xDC00 and 0xDC00 <= nxt < 0xE000:
            out.append(chr(0x10000 + ((c - 0xD800) << 10) + (nxt - 0xDC00)))
            i += 2
            continue
        out.append("\ufffd" if 0xD800 <= c < 0xE000 else text[i])
        i += 1
    return "".join(out)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec=None, exclude_categories=())))
def test_property_lone_surrogates_become_replacement_char(text: str) -> None:
    tok = get_tokenizer()
    assert tok.decode(tok.encode(text)) == _utf8_safe(text)


def test_surrogates_defined(tok: Tokenizer) -> None:
    text = "a\ud800b\udfffc\ud83d\ude00"
    assert tok.decode(tok.encode(text)) == "a\ufffdb\ufffdc😀"
    ids, mask = tok.batch_encode(["ok", text], 16)
    assert tok.decode(ids[1][mask[1]]) == "a\ufffdb\ufffdc😀"


def test_very_long_and_control_text(tok: Tokenizer) -> None:
    long = "the quick brown fox. " * 20000  # 420k characters
    ids, mask = tok.batch_encode([long, "".join(map(chr, range(32))) * 100], 77)
    assert mask.all() and ids[:, -1].tolist() == [tok.eos_id, tok.eos_id]
    control = "".join(map(chr, range(32))) + "\x7f\x85\u200b\ufeff"
    assert tok.decode(tok.encode(control)) == control


def test_bad_arguments(tok: Tokenizer) -> None:
    with pytest.raises(TypeError, match="sequence of strings"):
        tok.batch_encode("a single string", 8)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        tok.batch_encode(["ok", 3], 8)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="encode expects str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="context_length must be >= 1"):
        tok.batch_encode(["x"], 0)
    with pytest.raises(TypeError, match="context_length must be an int"):
        tok.batch_encode(["x"], 7.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])


def test_metadata_and_check_matches(tok: Tokenizer) -> None:
    meta = tok.metadata
    assert meta == {
        "kind": "bpe",
        "name": "default",
        "vocab_size": 8192,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": 0,
        "sha256": sha256_file(DEFAULT_DIR / "tokenizer.json"),
    }
    json.dumps(meta)  # goes into checkpoint configs
    tok.check_matches(meta)
    with pytest.raises(ValueError, match="vocab_size: expected 49408, got 8192") as info:
        tok.check_matches({**meta, "vocab_size": 49408, "sha256": "x"})
    assert "sha256" in str(info.value)


def test_pickle_round_trip(tok: Tokenizer) -> None:
    again = pickle.loads(pickle.dumps(tok))
    assert torch.equal(again.batch_encode(TEXTS, 16)[0], tok.batch_encode(TEXTS, 16)[0])


def test_shipped_sha256_matches_readme_and_meta() -> None:
    meta = json.loads((DEFAULT_DIR / META_FILE).read_text())
    actual = sha256_file(DEFAULT_DIR / meta["artifact"])
    assert meta["sha256"] == actual
    readme = (REPO / "tokenizer" / "README.md").read_text()
    shas = re.findall(r"\b[0-9a-f]{64}\b", readme)
    assert actual in shas, "tokenizer/README.md must state the artifact's sha256"
    assert meta["corpus"]["sha256"] in shas, "tokenizer/README.md must state the corpus sha256"
    assert "mmssl tokenizer train --default" in readme


def test_import_is_cheap() -> None:
    code = (
        "import sys, mmssl.tokenizer; "
        "heavy = {'torch', 'tokenizers', 'sentencepiece', 'deepspeed', 'webdataset'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- loading errors name the file ---------------------------------------------------------


def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        get_tokenizer(str(missing))


def test_missing_default_names_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokmod, "DEFAULT_DIR", tmp_path / "default")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "default"))):
        get_tokenizer()


@pytest.mark.parametrize(
    "filename, content, message",
    [
        ("tokenizer.json", b"{not json", "cannot read tokenizer file"),
        ("tokenizer.json", b'{"model": 1}', "cannot read tokenizer file"),
        ("tok.model", b"\x00garbage\xff" * 10, "cannot read sentencepiece model"),
        ("tok.vocab", b"whatever", "unknown tokenizer file type"),
    ],
)
def test_corrupt_file_names_it(tmp_path: Path, filename: str, content: bytes, message: str) -> None:
    bad = tmp_path / filename
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        get_tokenizer(str(bad))
    assert str(bad) in str(info.value)


def test_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no tokenizer file") as info:
        get_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    # a copied default whose artifact was edited after the meta was written
    (tmp_path / "tokenizer.json").write_bytes((DEFAULT_DIR / "tokenizer.json").read_bytes() + b" ")
    (tmp_path / META_FILE).write_bytes((DEFAULT_DIR / META_FILE).read_bytes())
    with pytest.raises(ValueError, match="sha256 differs") as info:
        get_tokenizer(str(tmp_path))
    assert str(tmp_path / "tokenizer.json") in str(info.value)
    (tmp_path / META_FILE).write_text("{broken")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / META_FILE))):
        get_tokenizer(str(tmp_path))
    (tmp_path / META_FILE).write_text(json.dumps({"artifact": "gone.json", "kind": "bpe"}))
    with pytest.raises(ValueError, match="missing keys"):
        get_tokenizer(str(tmp_path))
    (tmp_path / META_FILE).write_text("5")
    with pytest.raises(ValueError, match="expected a JSON object, got int"):
        get_tokenizer(str(tmp_path))


def test_plain_tokenizer_json_without_meta(tmp_path: Path, tok: Tokenizer) -> None:
    # a lone tokenizer.json finds its special ids by name
    copy = tmp_path / "my.json"
    copy.write_bytes((DEFAULT_DIR / "tokenizer.json").read_bytes())
    plain = get_tokenizer(str(copy))
    assert (plain.bos_id, plain.eos_id, plain.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert plain.encode("hello there") == tok.encode("hello there")


def test_without_meta_a_registered_special_token_wins_over_an_ordinary_piece(
    tmp_path: Path,
) -> None:
    """A GPT-2-style file whose vocabulary holds `</s>` and `<s>` as ordinary pieces and
    `<|endoftext|>` as its special token: the ordinary pieces were taken as eos and bos."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    hf = HF(models.BPE(vocab={"a": 0, "b": 1, "</s>": 2, "<s>": 3, "c": 4}, merges=[]))
    hf.add_special_tokens(["<|endoftext|>"])  # id 5
    hf.save(str(tmp_path / "tokenizer.json"))
    loaded = get_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (5, 5, 5)
    hf.add_special_tokens(["</s>"])  # registered special: it comes first in the list again
    hf.save(str(tmp_path / "tokenizer.json"))
    assert get_tokenizer(str(tmp_path / "tokenizer.json")).eos_id == 2


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bos_id": 99999}, "bos_id 99999 is outside the vocabulary [0, 8192)"),
        ({"bos_id": -1}, "bos_id -1 is outside the vocabulary"),
        ({"pad_id": 8192}, "pad_id 8192 is outside the vocabulary"),
        ({"eos_id": "2"}, "'eos_id' must be an integer, got '2'"),
        ({"eos_id": True}, "'eos_id' must be an integer, got True"),
        ({"eos_id": 1}, "eos_id 1 is '<|bos|>' in tokenizer.json, but special_tokens.eos is"),
        ({"special_tokens": {"bos": "<|nope|>"}}, "special_tokens.bos is '<|nope|>'"),
        ({"special_tokens": ["<|bos|>"]}, "'special_tokens' must map roles to strings"),
        ({"artifact": None}, "'artifact' must be a file name"),
        ({"artifact": "../tokenizer.json"}, "'artifact' must be a file name"),
        ({"kind": "sentencepiece"}, "kind 'sentencepiece' but tokenizer.json is 'bpe'"),
    ],
)
def test_bad_meta_is_rejected(tmp_path: Path, change: dict, message: str) -> None:
    from tokenizers import Tokenizer as HF  # the reference for the shipped vocabulary

    shipped = json.loads((DEFAULT_DIR / META_FILE).read_text())
    raw = HF.from_file(str(DEFAULT_DIR / "tokenizer.json"))
    assert raw.get_vocab_size() == 8192 and raw.id_to_token(shipped["bos_id"]) == "<|bos|>"
    (tmp_path / "tokenizer.json").write_bytes((DEFAULT_DIR / "tokenizer.json").read_bytes())
    (tmp_path / META_FILE).write_text(json.dumps({**shipped, **change}))
    with pytest.raises(ValueError) as info:
        get_tokenizer(str(tmp_path))
    assert message in str(info.value) and str(tmp_path / META_FILE) in str(info.value)


def test_meta_special_tokens_checked_for_sentencepiece(tmp_path: Path) -> None:
    from mmssl.tokenizer.train import Corpus, train_sentencepiece

    texts = [f"caption number {i} of a red digit" for i in range(50)]
    train_sentencepiece(Corpus(texts, "tiny"), tmp_path, vocab_size=300, show_progress=False)
    assert get_tokenizer(str(tmp_path)).bos_id == 1
    meta = json.loads((tmp_path / META_FILE).read_text())
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "bos_id": 3}))  # 3 is <|unk|>
    with pytest.raises(ValueError, match=re.escape("bos_id 3 is '<|unk|>'")):
        get_tokenizer(str(tmp_path))


def _bare_json(tmp_path: Path) -> str:
    copy = tmp_path / "src" / "my.json"  # no meta: special ids found by name
    copy.parent.mkdir()
    copy.write_bytes((DEFAULT_DIR / "tokenizer.json").read_bytes())
    return str(copy)


def _sentencepiece(tmp_path: Path) -> str:
    from mmssl.tokenizer.train import Corpus, train_sentencepiece

    texts = [f"caption number {i} of a red digit" for i in range(50)]
    train_sentencepiece(
        Corpus(texts, "tiny"), tmp_path / "src", vocab_size=300, show_progress=False
    )
    return str(tmp_path / "src")


@pytest.mark.parametrize(
    "source",
    [lambda p: "default", lambda p: "clip", _bare_json, _sentencepiece],
    ids=["default", "clip", "bare-json", "sentencepiece"],
)
def test_save_tokenizer_gives_the_same_tokenizer_from_its_folder(tmp_path: Path, source) -> None:
    from mmssl.tokenizer import save_tokenizer

    name = source(tmp_path)
    if name == "clip":
        pytest.importorskip("open_clip", reason="the 'clip' tokenizer reads open_clip's vocab")
    orig = get_tokenizer(name)
    meta_path = save_tokenizer(orig, tmp_path / "out")
    assert meta_path == tmp_path / "out" / META_FILE
    saved = get_tokenizer(tmp_path / "out")  # checks the meta against the copied file
    assert saved.path.parent == tmp_path / "out" and saved.path != orig.path
    assert saved.kind == orig.kind and saved.sha256 == sha256_file(orig.path)
    assert saved.metadata | {"name": 0} == orig.metadata | {"name": 0}
    ids, mask = orig.batch_encode(TEXTS, 24, add_bos=True)
    assert all(t.equal(u) for t, u in zip((ids, mask), saved.batch_encode(TEXTS, 24, add_bos=True)))
    assert [saved.decode(row) for row in ids] == [orig.decode(row) for row in ids]


def test_save_tokenizer_refuses_a_file_changed_since_it_loaded(tmp_path: Path) -> None:
    from mmssl.tokenizer import save_tokenizer

    orig = get_tokenizer(_bare_json(tmp_path))
    orig.path.write_text(orig.path.read_text() + "\n")  # retrained in place after the load
    with pytest.raises(ValueError, match="changed since its tokenizer loaded"):
        save_tokenizer(orig, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # nothing half-written


def test_a_file_loads_with_the_meta_beside_it_and_a_clip_meta_is_checked(tmp_path: Path) -> None:
    """A trained tokenizer loaded by its file path ignored the tokenizer_meta.json beside it
    (other special ids: a bos named only there was "no bos token", a pad id differed from the
    folder's); a CLIP copy's meta with other ids was ignored without a word."""
    from mmssl.tokenizer.corpus import Corpus
    from mmssl.tokenizer.train import train_bpe

    out = tmp_path / "custom"
    text = Corpus(["some text to learn a few merges from, " * 20] * 5, "tiny")
    train_bpe(text, out, vocab_size=300, pad="<|p|>", bos="<|start|>", show_progress=False)
    by_dir, by_file = get_tokenizer(out), get_tokenizer(out / "tokenizer.json")
    assert (by_file.bos_id, by_file.eos_id, by_file.pad_id) == (
        by_dir.bos_id,
        by_dir.eos_id,
        by_dir.pad_id,
    )
    assert (
        by_file.batch_encode(["a b"], 6)[0].tolist() == by_dir.batch_encode(["a b"], 6)[0].tolist()
    )
    clip = tmp_path / "clip"
    tokmod.save_tokenizer(get_tokenizer("clip"), clip)
    meta = json.loads((clip / META_FILE).read_text())
    (clip / META_FILE).write_text(json.dumps({**meta, "eos_id": 5, "bos_id": 7}))
    with pytest.raises(ValueError, match=r"\{'bos_id': 7, 'eos_id': 5\} differ from CLIP's"):
        get_tokenizer(clip)
    # a CLIP copy's meta naming its special tokens is checked too (it was NotImplementedError)
    good = {**meta, "special_tokens": {"bos": "<start_of_text>", "eos": "<end_of_text>"}}
    (clip / META_FILE).write_text(json.dumps(good))
    assert get_tokenizer(clip).eos_id == 49407
    (clip / META_FILE).write_text(json.dumps({**good, "special_tokens": {"eos": "<|eos|>"}}))
    with pytest.raises(ValueError, match="eos_id 49407 is '<end_of_text>'.*special_tokens.eos is"):
        get_tokenizer(clip)


def test_a_model_folder_without_a_copy_names_the_tokenizer_its_config_names(tmp_path: Path) -> None:
    """save_pretrained of an import writes no tokenizer copy (mmssl export does): the error
    said only "no tokenizer file", not that config.json names 'clip'."""
    import mmssl
    from mmssl.models.io import save_pretrained

    save_pretrained(
        mmssl.create_model("test_tiny_clip"), tmp_path, extra={"tokenizer": {"name": "clip"}}
    )
    with pytest.raises(
        FileNotFoundError, match=r"config.json names tokenizer 'clip': get_tokenizer\('clip'\)"
    ):
        get_tokenizer(tmp_path)


def test_clip_id_to_token_is_none_outside_the_vocabulary() -> None:
    """-1 read the last entry from the end of the vocabulary list."""
    clip = get_tokenizer("clip")
    assert clip.id_to_token(49407) == "<end_of_text>" and clip.id_to_token(0) == "!"
    assert clip.id_to_token(-1) is None and clip.id_to_token(49408) is None
