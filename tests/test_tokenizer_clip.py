"""CLIP BPE parity: mmssl's CLIPTokenizer against open_clip's own tokenizer on the same texts."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import random
import shutil
import string
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from mmssl.tokenizer import get_tokenizer
from mmssl.tokenizer.clip import CLIPTokenizer, open_clip_vocab_path


def load_open_clip_tokenizer() -> ModuleType:
    """open_clip's tokenizer module, the reference; loaded from its file so the test does
    not pay for `import open_clip` (timm, transformers: 5-15 s on the CI machine)."""
    if "open_clip.tokenizer" in sys.modules:
        return sys.modules["open_clip.tokenizer"]
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch (the parity reference) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


ACCENTED = "éèêëàâäîïôöùûüçñÉÀÇÑßøåæœłśźżčřšžőű" + "e\u0301a\u0300o\u0308"  # + combining
SCRIPTS = [
    "日本語のテキスト",
    "中文文本测试",
    "한국어 텍스트",
    "Ελληνικά κείμενο",
    "Русский текст",
    "العربية",
    "עברית",
    "हिन्दी पाठ",
    "ไทย",
    "ＦＵＬＬ－ＷＩＤＴＨ　１２３",
    "ﬁne ﬂow",
    "İstanbul ǅ ẞ",
]
EMOJI = ["🎉", "👍🏽", "👩‍👩‍👧", "🇫🇷", "❤️", "🫠", "😀😃😄", "⭐"]
TRICKY = [
    "",
    "   ",
    "\t\n\r\x0b\x0c",
    "<start_of_text>",
    "a <end_of_text> b",
    "x<<start_of_text>y",
    "<START_OF_TEXT>",
    "</w> tag",
    "it's we're they've I'm you'll he'd 'S 'T",
    "&amp; &lt;b&gt; &amp;amp;amp; &#39; &quot;",
    "cafÃ© mojibake â€œquotedâ€\x9d",
    "“curly” ‘quotes’ — dash – … ellipsis",
    "ctrl\x00\x01\x07\x1b[31mred\x1b[0m\x7f",
    "lone \ud800 surrogate \udfff and pair \ud83d\ude00",
    "nbsp\xa0thin\u2009ideo\u3000line\u2028para\u2029nel\x85fs\x1cgs\x1d",
    "zero\u200bwidth\u200djoin\ufeffbom",
    "\u0345\u0345 ypogegrammeni",
    "1234567890 3.14159 1,000,000 2024-01-31 12:30:00 -42 +7e-3 0x1F 1st 2nd",
]


def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def _random_word(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        return "".join(rng.choices(string.ascii_letters, k=rng.randint(1, 12)))
    if kind < 0.55:
        return "".join(rng.choices(string.digits + ".,-", k=rng.randint(1, 8)))
    if kind < 0.65:
        return "".join(rng.choices(string.punctuation, k=rng.randint(1, 5)))
    if kind < 0.75:
        return "".join(rng.choices(ACCENTED + string.ascii_lowercase, k=rng.randint(1, 8)))
    if kind < 0.85:
        script = rng.choice(SCRIPTS)
        start = rng.randrange(len(script))
        return script[start : start + rng.randint(1, 6)]
    if kind < 0.92:
        return rng.choice(EMOJI)
    # a random assigned-or-not BMP/astral code point, surrogates excluded
    cp = rng.choice(
        [rng.randint(0xA0, 0xD7FF), rng.randint(0xE000, 0xFFFD), rng.randint(0x10000, 0x2FFFF)]
    )
    return chr(cp)


def _random_space(rng: random.Random) -> str:
    if rng.random() < 0.8:
        return " "
    return "".join(
        rng.choices(
            [" ", "  ", "\t", "\n", "\r\n", "\xa0", "\u3000", "\u2003"], k=rng.randint(1, 4)
        )
    )


def parity_texts(n: int = 1200, seed: int = 0) -> list[str]:
    """Seeded mix: pydoc snippets, random words (letters, digits, punctuation, Unicode, emoji),
    whitespace runs, the tricky cases, and long texts that overflow 77 tokens."""
    rng = random.Random(seed)
    pydoc = _pydoc_text()
    texts = list(TRICKY)
    while len(texts) < n:
        kind = rng.random()
        if kind < 0.3:  # pydoc snippet, sometimes long enough to truncate
            start = rng.randrange(len(pydoc) - 2000)
            texts.append(pydoc[start : start + rng.choice([20, 80, 300, 600])])
        elif kind < 0.8:
            words = [_random_word(rng) for _ in range(rng.randint(1, 25))]
            texts.append(_random_space(rng).join(words) if rng.random() < 0.3 else " ".join(words))
        elif kind < 0.9:  # mixed case and entity-laden captions
            words = [
                _random_word(rng).upper() if rng.random() < 0.3 else _random_word(rng)
                for _ in range(6)
            ]
            texts.append(f"A photo of {' '.join(words)} &amp; {rng.randint(0, 999)}!")
        else:  # long: past the 77-token context
            texts.append(" ".join(_random_word(rng) for _ in range(rng.randint(60, 120))))
    return texts


@pytest.fixture(scope="module")
def oc() -> ModuleType:
    return load_open_clip_tokenizer()


@pytest.fixture(scope="module")
def clip() -> CLIPTokenizer:
    tok = get_tokenizer("clip")
    assert isinstance(tok, CLIPTokenizer)
    return tok


@pytest.mark.slow  # ~5 s: open_clip's pure-Python BPE is the slow half
def test_parity_with_open_clip_tokenize(clip: CLIPTokenizer, oc: ModuleType) -> None:
    texts = parity_texts()
    assert len(texts) >= 1000
    ids, mask = clip.batch_encode(texts, 77)
    ref = oc.tokenize(texts)  # (B, 77)
    bad = [i for i in range(len(texts)) if not torch.equal(ids[i], ref[i])]
    assert not bad, f"{len(bad)} texts differ, first: {texts[bad[0]]!r}"
    # CLIP pools at the eot token, which open_clip finds as argmax (eot is the largest id);
    # texts that spell out '<end_of_text>' hold an earlier eot, so they are left out here
    plain = torch.tensor(["_of_text>" not in t.lower() for t in texts])
    eot_at = ref.argmax(-1)  # (B,)
    assert torch.equal((mask.sum(1) - 1)[plain], eot_at[plain])
    assert torch.equal(mask[plain], (torch.arange(77) <= eot_at.unsqueeze(1))[plain])
    long = (mask.sum(1) == 77).sum().item()
    assert long >= 50, "the text set must exercise truncation"


def test_parity_other_context_lengths_and_encode(clip: CLIPTokenizer, oc: ModuleType) -> None:
    texts = parity_texts(200, seed=1)
    for context_length in (5, 16):
        ids, _ = clip.batch_encode(texts, context_length)
        assert torch.equal(ids, oc.tokenize(texts, context_length=context_length))
    ref_tok = oc._tokenizer
    for text in texts[:100]:
        assert clip.encode(text) == ref_tok.encode(text)


def test_parity_for_a_generator_of_texts(clip: CLIPTokenizer, oc: ModuleType) -> None:
    texts = parity_texts(40, seed=4)
    ids, mask = clip.batch_encode((t for t in texts), 77)
    assert ids.shape == (len(texts), 77)
    assert torch.equal(ids, oc.tokenize(t for t in texts))


def test_special_ids_and_shapes(clip: CLIPTokenizer) -> None:
    assert (clip.bos_id, clip.eos_id, clip.pad_id, clip.vocab_size) == (49406, 49407, 0, 49408)
    ids, mask = clip.batch_encode(["a photo of a cat."], 77)
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool and ids.shape == (1, 77)
    # hand-checked against CLIP: a=320 photo=1125 of=539 a=320 cat=2368 .=269
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert mask[0].sum() == 8


def test_decode_matches_open_clip(clip: CLIPTokenizer, oc: ModuleType) -> None:
    ref_tok = oc._tokenizer
    for text in parity_texts(200, seed=2):
        if "</w>" in text:
            continue  # open_clip's decode turns a literal '</w>' into a space too, also ours
        ids = clip.encode(text)
        plain = [i for i in ids if i not in (clip.bos_id, clip.eos_id)]
        assert clip.decode(ids) == ref_tok.decode(plain).rstrip(" ")
        framed = clip.encode(text, add_bos=True, add_eos=True)
        assert clip.decode(framed) == clip.decode(ids)
    # pad id 0 is also the token '!': padding is read from the mask, and decode keeps '!'
    assert clip.encode("!~") == [0, 349] and clip.decode([0, 349]) == "!~"


def test_user_vocab_path_and_pickle(clip: CLIPTokenizer, tmp_path) -> None:
    copy = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    shutil.copy(open_clip_vocab_path(), copy)
    tok = get_tokenizer(str(copy))
    texts = parity_texts(50, seed=3)
    assert torch.equal(tok.batch_encode(texts, 77)[0], clip.batch_encode(texts, 77)[0])
    assert tok.metadata["sha256"] == clip.metadata["sha256"]
    assert get_tokenizer(str(tmp_path)).sha256 == clip.sha256  # a directory holding the file
    again = pickle.loads(pickle.dumps(tok))
    assert torch.equal(again.batch_encode(texts, 77)[0], clip.batch_encode(texts, 77)[0])


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not gzip at all", "cannot read CLIP vocab"),
        (gzip.compress(b"#v\nab\n"), "expected a merge"),
    ],
)
def test_corrupt_vocab_names_file(tmp_path, content: bytes, message: str) -> None:
    bad = tmp_path / "vocab.txt.gz"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        get_tokenizer(str(bad))
    assert str(bad) in str(info.value)


def test_a_vocab_file_is_inflated_only_as_far_as_its_merges(tmp_path) -> None:
    """The whole file was inflated and decoded before its first line was read: a 1 MB file
    of zeros took 7.7 GB.  Here 64 MiB of zeros on one line, read with a bounded peak."""
    import tracemalloc

    bomb = tmp_path / "bomb.txt.gz"
    bomb.write_bytes(gzip.compress(b"#version\n" + bytes(64 << 20), 1))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="expected a merge"):
            get_tokenizer(str(bomb))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


def test_missing_vocab_names_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="vocab.txt.gz"):
        CLIPTokenizer(tmp_path / "vocab.txt.gz")


def test_very_long_texts(clip: CLIPTokenizer, oc: ModuleType) -> None:
    texts = ["A cat, a dog & 7 birds! " * 2000, "ab" * 200, "日本語テキスト" * 500]
    assert torch.equal(clip.batch_encode(texts, 77)[0], oc.tokenize(texts))
    # one 200k-letter word: open_clip's Python BPE is quadratic here, so check ours alone
    ids, mask = clip.batch_encode(["x" * 200_000], 77)
    assert mask.all() and ids[0, 0] == clip.bos_id and ids[0, -1] == clip.eos_id


@pytest.mark.parametrize("blocked", [("ftfy",), ("regex",), ("ftfy", "regex")])
def test_without_ftfy_or_regex_the_clip_tokenizer_is_refused(monkeypatch, blocked) -> None:
    """Its fallback (NFC, tokenizers' regex engine) gave other ids than open_clip on everyday
    captions ("dog’s", "ﬁsh", full-width letters) under the same tokenizer record, so a
    model trained with open_clip's ids was fed others: refused, naming what to install."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in blocked else real(name, *a)
    )
    with pytest.raises(ValueError) as err:
        CLIPTokenizer()  # not get_tokenizer("clip"): it caches the tokenizers it built
    assert str(err.value) == (
        f"the CLIP tokenizer needs {' and '.join(blocked)} (open_clip's text cleaning and "
        f"splitting) for open_clip's ids: pip install {' '.join(blocked)} (in mmssl's "
        "interop extra)"
    )


def test_open_clip_cleans_everyday_captions_that_nfc_alone_would_not(
    clip: CLIPTokenizer, oc: ModuleType
) -> None:
    """The texts the refused fallback got wrong, against open_clip itself."""
    texts = ["the dog’s ball", "a ﬁsh", "ＣＬＩＰ model", "CafÃ© au lait"]
    ids, _ = clip.batch_encode(texts, 16)
    assert ids.tolist() == oc.tokenize(texts, context_length=16).tolist()
