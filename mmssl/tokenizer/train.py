"""Training tokenizers: byte-level BPE (`tokenizers`) or unigram/BPE (`sentencepiece`).

    mmssl tokenizer train --out DIR [--kind bpe|sentencepiece] [--vocab-size N] INPUT ...
    mmssl tokenizer train --default        # rebuild tokenizer/default byte-for-byte

Inputs are plain text files (one text per line), JSONL files (one field per record),
WebDataset tar shards, plain or gzip/bzip2/xz (the `txt` member of each sample), or
directories of these. The output directory receives the artifact (tokenizer.json or
tokenizer.model) and tokenizer_meta.json: vocab size, special ids, corpus description and sha256s.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from mmssl.shipped import in_checkout
from mmssl.tokenizer import DEFAULT_DIR
from mmssl.tokenizer.base import META_FILE
from mmssl.tokenizer.corpus import DIR_SUFFIXES, Corpus, default_corpus, expand_inputs, iter_corpus
from mmssl.tokenizer.output import check_out_dir, meta_record, publish

__all__ = [
    "Corpus",
    "build_default",
    "default_corpus",
    "iter_corpus",
    "main",
    "train_bpe",
    "train_sentencepiece",
]

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
UNK = "<|unk|>"  # sentencepiece only; byte-level BPE needs no unknown token
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_MIN_FREQUENCY = 2
MAX_LINE_BYTES = 1 << 16  # sentencepiece drops longer lines (its max_sentence_length)
# The shipped default: every pair seen at least once, so the vocabulary reaches 8192.
DEFAULT_ARTIFACT_MIN_FREQUENCY = 1


def _progress(corpus: Corpus, show: bool) -> Iterable[str]:
    from tqdm import tqdm

    # disable=None hides the bar when stderr is not a terminal (CI logs stay clean)
    return tqdm(
        corpus,
        total=corpus.total,
        unit="text",
        desc="reading corpus",
        disable=None if show else True,
    )


def _check_seed(seed: int) -> None:
    # sentencepiece takes an unsigned 32-bit seed and fails with a binding TypeError otherwise
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")


def _specials(pad: str, bos: str, eos: str, extra: Sequence[str]) -> list[str]:
    tokens = [pad, bos, eos, *extra]
    if len(set(tokens)) != len(tokens) or not all(tokens):
        raise ValueError(f"special tokens must be distinct and non-empty, got {tokens}")
    return tokens


def train_bpe(
    corpus: Corpus,
    out_dir: str | Path,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = DEFAULT_MIN_FREQUENCY,
    pad: str = PAD,
    bos: str = BOS,
    eos: str = EOS,
    extra_special_tokens: Sequence[str] = (),
    seed: int = 0,
    show_progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a byte-level BPE; write tokenizer.json and tokenizer_meta.json; return the meta.

    Special ids are pad 0, bos 1, eos 2, then the extras. Training is deterministic (ties
    between equally frequent pairs break by pair id), so `seed` is only recorded.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = _specials(pad, bos, eos, extra_special_tokens)
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be >= {256 + len(specials)} (bytes + specials)")
    _check_seed(seed)
    check_out_dir(out_dir, overwrite)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for s in specials:
        # a merge that rebuilds such a word from ordinary text gets the special token's id,
        # and user text could then forge it
        if len(tok.pre_tokenizer.pre_tokenize_str(s)) == 1:
            raise ValueError(
                f"special token {s!r} is a single word to the byte-level pre-tokenizer, so BPE "
                f"merges could rebuild it from ordinary text; delimit it, e.g. '<|{s}|>'"
            )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_progress(corpus, show_progress), trainer=trainer)
    if corpus.num_texts == 0:
        raise ValueError(f"empty corpus: {corpus.description}")
    data = (tok.to_str() + "\n").encode("utf-8")
    options = {"vocab_size": vocab_size, "min_frequency": min_frequency, "seed": seed}
    library = f"tokenizers {tokenizers.__version__}"
    meta = meta_record("bpe", tok.get_vocab_size(), specials, corpus, options, library)
    return publish(out_dir, "tokenizer.json", data, meta)


def train_sentencepiece(
    corpus: Corpus,
    out_dir: str | Path,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    model_type: str = "unigram",
    pad: str = PAD,
    bos: str = BOS,
    eos: str = EOS,
    extra_special_tokens: Sequence[str] = (),
    seed: int = 0,
    threads: int = 1,
    show_progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a sentencepiece unigram or BPE model; write tokenizer.model and tokenizer_meta.json.

    Ids: pad 0, bos 1, eos 2, unk 3, extras after. Lossless settings: identity
    normalisation, whitespace kept, byte fallback for unseen characters. Texts are split
    into lines (sentencepiece trains on sentences). One thread keeps it deterministic.
    Lines over MAX_LINE_BYTES UTF-8 bytes are not trained on; the meta's corpus counts
    them in dropped_long_lines and dropped_long_chars (the CLI warns when they are not 0).
    """
    import sentencepiece as spm

    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    specials = _specials(pad, bos, eos, extra_special_tokens)
    if UNK in specials:  # sentencepiece's own check fails with its internal trainer text
        raise ValueError(
            f"special tokens must differ from the unknown token {UNK!r}, got {specials}"
        )
    for token in specials:
        # byte fallback names the 256 byte pieces <0x00>..<0xFF>: a special of such a name
        # took that byte's id (a newline became eos); U+2581 is sentencepiece's space, and
        # a special holding it decoded every space as that special
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            raise ValueError(
                f"special token {token!r} is the name of a byte piece (<0x00>..<0xFF>): "
                "text holding that byte would encode as the special token"
            )
        if "\u2581" in token:
            raise ValueError(
                f"special token {token!r} holds U+2581, sentencepiece's space: every space "
                "would decode as it"
            )
    _check_seed(seed)
    check_out_dir(out_dir, overwrite)
    failed: list[Exception] = []
    usable = 0  # lines sentencepiece trains on: non-empty, at most MAX_LINE_BYTES
    long_lines = long_chars = 0  # lines over MAX_LINE_BYTES, and their characters

    def lines() -> Iterator[str]:
        # sentencepiece turns an error raised here into a RuntimeError holding a traceback
        # excerpt; keep the reader's own error (a bad file, invalid JSON) to raise it instead
        nonlocal usable, long_lines, long_chars
        try:
            for text in _progress(corpus, show_progress):
                for line in text.split("\n"):
                    if not line:
                        continue
                    # a UTF-8 character is at most 4 bytes: encode only the long lines
                    if len(line) > MAX_LINE_BYTES // 4 and len(line.encode()) > MAX_LINE_BYTES:
                        # sentencepiece would skip it without a word; skip it here to count it
                        long_lines += 1
                        long_chars += len(line)
                        continue
                    usable += 1
                    yield line
        except Exception as e:
            failed.append(e)
            raise

    writer = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(),
            model_writer=writer,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3,
            pad_piece=pad, bos_piece=bos, eos_piece=eos, unk_piece=UNK,
            control_symbols=list(extra_special_tokens),
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            hard_vocab_limit=False,
            max_sentence_length=MAX_LINE_BYTES,
            num_threads=threads,
            minloglevel=2,
        )  # fmt: skip
    except RuntimeError as e:
        if failed:
            raise failed[0] from None
        if corpus.num_texts == 0:
            raise ValueError(f"empty corpus: {corpus.description}") from None
        if usable == 0:  # sentencepiece says only "[!sentences_.empty()]"
            raise ValueError(
                f"no text to train on in {corpus.description}: every line is empty or longer "
                f"than sentencepiece's {MAX_LINE_BYTES} bytes (--kind bpe has no line limit)"
            ) from None
        said = str(e).strip().splitlines()[-1]
        need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", said)
        if need:  # sentencepiece's advice names an option mmssl does not have
            said = (
                f"vocab_size {vocab_size} is below the {need[1]} pieces this corpus needs (256 "
                "bytes, the special tokens and each distinct character): raise it"
            )
        raise ValueError(f"sentencepiece training failed: {said}") from None
    data = writer.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=data)
    options = {"vocab_size": vocab_size, "model_type": model_type, "seed": seed, "threads": threads}
    meta = meta_record(
        "sentencepiece",
        sp.get_piece_size(),
        specials,  # extras are control symbols at ids 4.., after unk
        corpus,
        options,
        f"sentencepiece {spm.__version__}",
    )
    meta["special_tokens"]["unk"] = UNK
    meta["unk_id"] = 3
    # num_chars and sha256 describe every text read; these say what training left out
    meta["corpus"]["dropped_long_lines"] = long_lines
    meta["corpus"]["dropped_long_chars"] = long_chars
    return publish(out_dir, "tokenizer.model", data, meta)


def build_default(
    out_dir: str | Path = DEFAULT_DIR, show_progress: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Rebuild the shipped default tokenizer (see tokenizer/README.md); it replaces the one in
    DEFAULT_DIR, one elsewhere only with `overwrite`."""
    return train_bpe(
        default_corpus(),
        out_dir,
        vocab_size=DEFAULT_VOCAB_SIZE,
        min_frequency=DEFAULT_ARTIFACT_MIN_FREQUENCY,
        show_progress=show_progress,
        overwrite=overwrite or Path(out_dir).resolve() == DEFAULT_DIR.resolve(),
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # one line, no usage dump: the house rule for bad CLI input
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mmssl tokenizer train",
        description="Train a tokenizer on text files, JSONL or WebDataset .tar shards.",
    )
    p.add_argument(
        "inputs",
        nargs="*",
        help="text files, .jsonl, tar shards (.tar, gzip, bzip2, xz) or directories",
    )
    p.add_argument("--default", action="store_true", help="rebuild the shipped default tokenizer")
    p.add_argument("--out", help=f"output directory (with --default: {DEFAULT_DIR})")
    p.add_argument("--kind", choices=("bpe", "sentencepiece"), help="trainer (default: bpe)")
    p.add_argument(
        "--model-type",
        choices=("unigram", "bpe"),
        help="sentencepiece model type (default: unigram)",
    )
    p.add_argument(
        "--vocab-size", type=int, help=f"vocabulary size (default: {DEFAULT_VOCAB_SIZE})"
    )
    p.add_argument(
        "--min-frequency",
        type=int,
        help=f"byte-level BPE: min pair count (default: {DEFAULT_MIN_FREQUENCY})",
    )
    p.add_argument("--bos", help=f"begin-of-text token (default: {BOS})")
    p.add_argument("--eos", help=f"end-of-text token (default: {EOS})")
    p.add_argument("--pad", help=f"padding token (default: {PAD})")
    p.add_argument("--special-token", action="append", help="an extra special token (repeatable)")
    p.add_argument("--field", help="JSONL field holding the text (default: text)")
    p.add_argument(
        "--tar-field", help="WebDataset member extension holding the text (default: txt)"
    )
    p.add_argument("--seed", type=int, help="sentencepiece sampling seed (default: 0)")
    p.add_argument("--threads", type=int, help="sentencepiece threads (default: 1, deterministic)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    return p


def _given(value: str | None, default: str) -> str:
    return default if value is None else value


def _run(args: argparse.Namespace) -> dict[str, Any]:
    options = {
        k: v
        for k, v in vars(args).items()
        if k not in ("inputs", "default", "out", "quiet", "overwrite")
    }
    if args.default:
        given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v is not None]
        if args.inputs or given:
            raise ValueError(
                f"--default takes only --out, --overwrite and --quiet, got {' '.join(args.inputs + given)}"
            )
        if args.out is None and not in_checkout():
            # an installed package's copy is the wheel's, and its RECORD hashes it
            raise ValueError(
                f"--default rebuilds a checkout's tokenizer/default; this package is installed "
                f"({DEFAULT_DIR}), so pass --out"
            )
        return build_default(
            args.out or DEFAULT_DIR, show_progress=not args.quiet, overwrite=args.overwrite
        )
    if not args.out:
        raise ValueError("--out is required (or use --default)")
    if not args.inputs:
        raise ValueError("no inputs given")
    kind = args.kind or "bpe"
    if kind == "bpe" and (args.model_type or args.threads is not None):
        raise ValueError("--model-type and --threads apply to --kind sentencepiece only")
    if kind == "sentencepiece" and args.min_frequency is not None:
        raise ValueError("--min-frequency applies to --kind bpe only")
    for name in ("vocab_size", "min_frequency", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    # an empty value must not fall back to the default silently
    for name in ("pad", "bos", "eos", "field", "tar_field"):
        if getattr(args, name) == "":
            raise ValueError(f"--{name.replace('_', '-')} must not be empty")
    if "" in (args.special_token or []):
        raise ValueError("--special-token must not be empty")
    files, skipped = expand_inputs(args.inputs)
    description = "files: " + ", ".join(map(str, args.inputs))
    if skipped:
        # directories hold only .txt/.jsonl/tar-shard training text; say what else was left out
        names = ", ".join(p.name for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        kinds = "/".join(DIR_SUFFIXES)
        note = f"skipped {len(skipped)} file(s) in input directories, not {kinds}: {names}"
        print(f"mmssl tokenizer train: {note}", file=sys.stderr)
        description += f" ({note})"
    texts = iter_corpus(
        files, field=_given(args.field, "text"), tar_field=_given(args.tar_field, "txt")
    )
    corpus = Corpus(texts, description)
    common: dict[str, Any] = {
        "vocab_size": args.vocab_size or DEFAULT_VOCAB_SIZE,
        "pad": _given(args.pad, PAD),
        "bos": _given(args.bos, BOS),
        "eos": _given(args.eos, EOS),
        "extra_special_tokens": args.special_token or [],
        "seed": args.seed or 0,
        "show_progress": not args.quiet,
        "overwrite": args.overwrite,
    }
    if kind == "bpe":
        min_frequency = args.min_frequency or DEFAULT_MIN_FREQUENCY
        return train_bpe(corpus, args.out, min_frequency=min_frequency, **common)
    meta = train_sentencepiece(
        corpus,
        args.out,
        model_type=args.model_type or "unigram",
        threads=args.threads or 1,
        **common,
    )
    dropped = meta["corpus"]["dropped_long_lines"]
    if dropped:  # training went on without them: say so, or a corpus shrinks unnoticed
        print(
            f"mmssl tokenizer train: warning: dropped {dropped} line(s) "
            f"({meta['corpus']['dropped_long_chars']} characters) longer than sentencepiece's "
            f"{MAX_LINE_BYTES} bytes; they are not trained on (--kind bpe has no line limit)",
            file=sys.stderr,
        )
    return meta


def main(argv: list[str] | None = None) -> int:
    """`mmssl tokenizer train ...`; argv starts with the subcommand "train"."""
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = "usage: mmssl tokenizer train [--default] [--out DIR] [options] [INPUT ...]"
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):  # the one subcommand's whole help, options included
        print(_parser().format_help(), end="")
        return 0
    if argv[0] != "train":
        print(  # one line, as every other mmssl error
            f"mmssl tokenizer: error: unknown subcommand {argv[0]!r} (expected 'train')",
            file=sys.stderr,
        )
        return 2
    try:
        args = _parser().parse_args(argv[1:])
    except SystemExit as e:  # argparse already printed one line; keep main() returning
        return int(e.code or 0)
    try:
        meta = _run(args)
    except (ValueError, OSError) as e:  # OSError: a file not found, or --out unwritable after all
        print(f"mmssl tokenizer train: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else DEFAULT_DIR
    print(
        f"wrote {out / meta['artifact']} (vocab_size {meta['vocab_size']}, "
        f"sha256 {meta['sha256']}) and {out / META_FILE}"
    )
    return 0
