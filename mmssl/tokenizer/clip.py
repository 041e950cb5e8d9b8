"""CLIP's BPE tokenizer, with ids identical to open_clip's `SimpleTokenizer` / `open_clip.tokenize`.

Built from the vocabulary file `bpe_simple_vocab_16e6.txt.gz` (read from the installed
open_clip package or from a user path; never downloaded). The steps mirror open_clip:

1. clean: `ftfy.fix_text`, `html.unescape` twice, strip, collapse whitespace, lower-case;
2. split with open_clip's regex (IGNORECASE, special tokens first): the `regex` module
   for non-ASCII text, the same pattern inside `tokenizers` for ASCII text;
3. byte-level BPE with a `</w>` end-of-word suffix, run by the fast `tokenizers` library.

Both `ftfy` and `regex` (open_clip's own dependencies) are required: without them the
tokenizer is refused.  A fallback (NFC and tokenizers' regex engine) gave other ids than
open_clip on everyday captions (curly apostrophes, ligatures, full-width letters, mojibake)
and nothing in a checkpoint's tokenizer record told the two apart.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from mmssl.tokenizer.base import Tokenizer, sha256_file

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<start_of_text>", "<end_of_text>"
NUM_MERGES = 49152 - 256 - 2  # open_clip keeps this many merge lines
CONTEXT_LENGTH = 77
_PATTERN = SOT + "|" + EOT + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (CLIP uses the same)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in set(printable)]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def open_clip_vocab_path() -> Path:
    """The vocab file inside the installed open_clip package, located without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"open_clip is not installed, so {VOCAB_FILE} cannot be found; "
            f"pass the path to a copy of it instead of 'clip'"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"CLIP vocab file not found: {path}")
    return path


def read_merges(path: Path) -> list[tuple[str, str]]:
    """The first NUM_MERGES merge rules of a CLIP vocab file, with errors naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"CLIP vocab file not found: {path}")
    # only the lines used are inflated, each at most 1 KiB, and the first bad one ends the
    # read: the whole file was inflated and decoded first (a 1 MB file of zeros: 7.7 GB)
    merges = []
    try:
        with gzip.open(path, "rt", encoding="utf-8", newline="\n") as f:
            f.readline(1024)  # the version line
            for lineno in range(2, NUM_MERGES + 2):
                line = f.readline(1024)
                if not line:
                    break
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(f"{path}:{lineno}: expected a merge 'a b', got {line[:40]!r}")
                merges.append((parts[0], parts[1]))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read CLIP vocab file {path}: {e}") from None
    if not merges:
        raise ValueError(f"{path}: no merge rules")
    return merges


def _missing_modules() -> list[str]:
    """Which of open_clip's text modules (ftfy, regex) are not installed."""
    return [m for m in ("ftfy", "regex") if importlib.util.find_spec(m) is None]


def _make_cleaner() -> Callable[[str], str]:
    from ftfy import fix_text

    def clean(text: str) -> str:
        # Printable ASCII without '&' is a fixed point of ftfy and html.unescape (skip them).
        if not (text.isascii() and text.isprintable() and "&" not in text):
            text = html.unescape(html.unescape(fix_text(text)))
        return " ".join(text.split()).lower()

    return clean


def _make_splitter() -> Callable[[str], list[str]]:
    import regex

    return regex.compile(_PATTERN, regex.IGNORECASE).findall


class CLIPTokenizer(Tokenizer):
    """open_clip-compatible CLIP BPE: sot 49406, eot 49407, pad 0, vocab_size 49408.

    `batch_encode(texts, 77)` equals `open_clip.tokenize(texts)`; the mask marks sot..eot.
    `decode` drops special ids and the trailing space open_clip's decode leaves.
    """

    kind = "clip"

    def __init__(self, path: str | Path | None = None, name: str | None = None) -> None:
        from tokenizers import Regex, models, pre_tokenizers
        from tokenizers import Tokenizer as _HF

        missing = _missing_modules()
        if missing:
            raise ValueError(
                f"the CLIP tokenizer needs {' and '.join(missing)} (open_clip's text cleaning "
                f"and splitting) for open_clip's ids: pip install {' '.join(missing)} (in "
                "mmssl's interop extra)"
            )
        self.path = Path(path) if path is not None else open_clip_vocab_path()
        self.name = name if name is not None else str(self.path)
        merges = read_merges(self.path)
        chars = list(bytes_to_unicode().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
        self._vocab = vocab
        encoder = {token: i for i, token in enumerate(vocab)}
        bpe = models.BPE(
            vocab=encoder, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>"
        )
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        # Two front ends over one BPE model. ASCII text is split by tokenizers' own regex
        # engine; other text by the `regex` module in Python, as open_clip does, because the
        # engines' Unicode tables differ for recently assigned characters.
        self._tok = _HF(bpe)
        onig_split = pre_tokenizers.Split(Regex("(?i)" + _PATTERN), behavior="removed", invert=True)
        self._tok.pre_tokenizer = pre_tokenizers.Sequence([onig_split, byte_level])
        self._tok_words = _HF(bpe)  # words already split, joined by single spaces
        self._tok_words.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), byte_level]
        )
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self.sha256 = sha256_file(self.path)
        self.vocab_size = len(vocab)
        self.bos_id, self.eos_id, self.pad_id = encoder[SOT], encoder[EOT], 0
        self._clean = _make_cleaner()
        self._split = _make_splitter()

    @property
    def special_ids(self) -> frozenset[int]:
        """The ids `decode` drops: bos and eos only."""
        # pad 0 is the real token '!', so decode must keep it
        return frozenset((self.bos_id, self.eos_id))

    def id_to_token(self, idx: int) -> str | None:
        """The vocabulary entry of an in-range id (used to check tokenizer_meta.json)."""
        return self._vocab[idx] if 0 <= idx < len(self._vocab) else None

    def __getstate__(self) -> dict[str, Any]:
        # closures do not pickle (DataLoader workers under spawn); rebuild them on load
        state = dict(self.__dict__)
        del state["_clean"], state["_split"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._clean = _make_cleaner()
        self._split = _make_splitter()

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        cleaned = [self._clean(t) for t in texts]
        out: list[list[int]] = [[] for _ in cleaned]
        direct: list[int] = []  # split by tokenizers
        joined: dict[int, str] = {}  # split here, words joined by spaces
        for i, text in enumerate(cleaned):
            if "_of_text>" in text:  # may spell a special token: the rare exact path
                out[i] = self._encode_with_specials(self._words(text))
            elif text.isascii():
                direct.append(i)
            else:
                joined[i] = " ".join(self._words(text))
        batch = self._tok.encode_batch_fast([cleaned[i] for i in direct], add_special_tokens=False)
        for i, enc in zip(direct, batch):
            out[i] = enc.ids
        batch = self._tok_words.encode_batch_fast(list(joined.values()), add_special_tokens=False)
        for i, enc in zip(joined, batch):
            out[i] = enc.ids
        return out

    def _words(self, text: str) -> list[str]:
        return self._split(text)

    def _encode_with_specials(self, words: list[str]) -> list[int]:
        # open_clip maps a literal '<start_of_text>' word to its special id
        ids: list[int] = []
        run: list[str] = []
        seq: list[str | None] = [*words, None]
        for word in seq:
            if word is None or word in (SOT, EOT):
                if run:
                    ids += self._tok_words.encode(" ".join(run), add_special_tokens=False).ids
                    run = []
                if word is not None:
                    ids.append(self.bos_id if word == SOT else self.eos_id)
            else:
                run.append(word)
        return ids

    def _decode_ids(self, ids: list[int]) -> str:
        text = "".join(self._vocab[i] for i in ids)
        raw = bytearray(self._byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").rstrip(" ")
