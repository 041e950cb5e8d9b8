"""Tokenizer rules against naive references: bos/eos framing, padding with a pad id that is
not 0, the pad fallback of a tokenizer.json without one, sentencepiece's lossless training
options, and corpus lines of a CRLF text file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mmssl.tokenizer import Tokenizer, get_tokenizer
from mmssl.tokenizer.train import Corpus, iter_corpus, train_sentencepiece

TEXTS = ["ab", "", "cab", "abcabcabc"]


def _no_pad_json(tmp_path: Path) -> Tokenizer:
    """A tokenizer.json with <s> and </s> registered as special tokens and no pad token, and
    no tokenizer_meta.json: its ids are found by name, bos 3, eos 4, and pad falls back."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    hf = HF(models.BPE(vocab={"a": 0, "b": 1, "c": 2}, merges=[]))
    hf.add_special_tokens(["<s>", "</s>"])  # ids 3 and 4
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = get_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id) == (hf.token_to_id("<s>"), hf.token_to_id("</s>")) == (3, 4)
    return tok


def test_without_a_pad_token_pad_is_eos(tmp_path: Path) -> None:
    """A tokenizer.json without a pad token pads with eos (GPT-2's convention, and the rule the
    sentencepiece loader documents: "its pad id, or eos when the model has no pad"); taking
    bos instead went unseen, as every such test file had bos == eos."""
    tok = _no_pad_json(tmp_path)
    assert tok.pad_id == tok.eos_id == 4 and tok.pad_id != tok.bos_id


@pytest.mark.parametrize("add_bos, add_eos", [(True, True), (True, False), (False, True)])
def test_batch_encode_pads_with_a_nonzero_pad_id(tmp_path: Path, add_bos, add_eos) -> None:
    """Padding is pad_id: the rows were filled with 0 before the ids were scattered in, which
    only the shipped tokenizers (pad 0) could not tell apart; here pad is 4 and 0 is 'a'."""
    tok = _no_pad_json(tmp_path)
    T = 6
    ids, mask = tok.batch_encode(TEXTS, T, add_bos=add_bos, add_eos=add_eos)
    for row, valid, text in zip(ids.tolist(), mask.tolist(), TEXTS):
        raw = [ord(c) - ord("a") for c in text]  # the vocabulary a, b, c = 0, 1, 2
        assert tok.encode(text) == raw
        full = [3] * add_bos + raw + [4] * add_eos
        n = min(len(full), T)
        want = full[:n] if not add_eos else full[: n - 1] + [4]
        assert row == want + [tok.pad_id] * (T - n) and valid == [True] * n + [False] * (T - n)
    assert ids[~mask].eq(4).all() and ids[~mask].numel() > 0


@pytest.mark.parametrize("source", ["default", "json"])
def test_encode_adds_exactly_the_special_tokens_asked_for(tmp_path: Path, source: str) -> None:
    """encode(add_bos=True) added an eos too, and encode(add_eos=True) alone none: the
    tests only framed with both flags at once.  Reference: [bos]? + encode(s) + [eos]?."""
    tok = get_tokenizer() if source == "default" else _no_pad_json(tmp_path)
    for text in ["a photo of the digit seven.", "", "x"] if source == "default" else TEXTS:
        ids = tok.encode(text)
        for add_bos in (False, True):
            for add_eos in (False, True):
                want = [tok.bos_id] * add_bos + ids + [tok.eos_id] * add_eos
                assert tok.encode(text, add_bos=add_bos, add_eos=add_eos) == want, (text, add_bos)


@pytest.fixture(scope="module")
def small_spm(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A 300-id sentencepiece model trained on ASCII captions with single spaces only."""
    out = tmp_path_factory.mktemp("spm")
    texts = [f"caption number {i} of a red digit" for i in range(50)]
    train_sentencepiece(Corpus(texts, "tiny"), out, vocab_size=300, show_progress=False)
    return get_tokenizer(str(out))


@pytest.mark.parametrize("text", ["日本語", "emoji 😀👍🏽 and ÆØÅ", "a ☃ b", "\x00\x7f"])
def test_sentencepiece_round_trips_characters_it_never_saw(small_spm: Tokenizer, text) -> None:
    """Unseen characters fall back to their UTF-8 bytes; without byte fallback they were one
    <unk> and decoded as ' ⁇ ', while the training corpora of the tests held every character."""
    import sentencepiece as spm

    ids = small_spm.encode(text)
    assert small_spm.decode(ids) == text
    raw = spm.SentencePieceProcessor(model_file=str(small_spm.path))  # the peer library
    assert 3 not in ids and not any(raw.is_unknown(i) for i in ids)  # 3 is <|unk|>


@pytest.mark.parametrize("text", ["a   b  ", "  two leading spaces", "x  y", " ", "end  "])
def test_sentencepiece_keeps_runs_of_spaces(small_spm: Tokenizer, text: str) -> None:
    """Whitespace is kept as is: with remove_extra_whitespaces the model squeezed runs of
    spaces to one and stripped both ends, so 'a   b  ' decoded as 'a b'."""
    assert small_spm.decode(small_spm.encode(text)) == text
    assert small_spm.decode(small_spm.encode(text, add_bos=True, add_eos=True)) == text


def test_a_crlf_text_file_gives_the_lines_and_hash_of_its_lf_copy(tmp_path: Path) -> None:
    """Lines of a text file end at \\r\\n as at \\n: the \\r was left on each line of a Windows
    file, training on it and hashing other texts than the same file with \\n endings."""
    lines = ["first line", "second, with  two spaces", "", "  indented", "last"]
    (tmp_path / "lf.txt").write_bytes("\n".join(lines).encode() + b"\n")
    (tmp_path / "crlf.txt").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    want = [line for line in lines if line]  # blank lines are skipped
    crlf = Corpus(iter_corpus([tmp_path / "crlf.txt"]), "d")
    assert list(crlf) == want
    lf = Corpus(iter_corpus([tmp_path / "lf.txt"]), "d")
    assert list(lf) == want
    assert crlf.summary() == lf.summary()
    data = b"".join(line.encode() + b"\0" for line in want)  # each text then a NUL byte
    assert crlf.summary()["sha256"] == hashlib.sha256(data).hexdigest()
