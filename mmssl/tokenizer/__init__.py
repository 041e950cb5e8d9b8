"""Loading tokenizers: the shipped default, CLIP's BPE, or a user's tokenizer.json / .model.

    tok = get_tokenizer()                      # tokenizer/default (byte-level BPE, 8192 ids)
    ids, mask = tok.batch_encode(texts, 77)    # (B, 77) int64, (B, 77) bool
    tok = get_tokenizer("clip")                # open_clip-identical CLIP BPE

Backends (`tokenizers`, `sentencepiece`) are imported only when a tokenizer is built, so
importing this package is cheap.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmssl import _submodule_attributes
from mmssl.shipped import shipped_path
from mmssl.tokenizer.base import META_FILE, META_FORMAT, Tokenizer, sha256_file

__all__ = ["DEFAULT_DIR", "META_FILE", "Tokenizer", "get_tokenizer", "read_meta", "save_tokenizer"]

# tokenizer/default of the checkout, or an installed wheel's copy (mmssl.shipped).
DEFAULT_DIR = shipped_path("tokenizer", "default")
ARTIFACTS = ("tokenizer.json", "*.model", "*.txt.gz")
# The file name `save_tokenizer` gives each kind of artifact, by its suffix.
SAVED_NAMES = {
    ".json": "tokenizer.json",
    ".model": "tokenizer.model",
    ".txt.gz": "tokenizer.txt.gz",
}


def get_tokenizer(name_or_path: str | Path | None = None) -> Tokenizer:
    """Load a tokenizer by name or path.

    Args:
        name_or_path: None or "default" (the shipped byte-level BPE in tokenizer/default),
            "clip" (CLIP BPE from the installed open_clip's vocab file), or a path to a
            `tokenizer.json`, a sentencepiece `.model`, a CLIP vocab `.txt.gz`, or a
            directory holding one of these (plus an optional tokenizer_meta.json).

    Loaded tokenizers are cached per file and are immutable; share them freely.
    """
    if name_or_path is None or name_or_path == "default":
        if not (DEFAULT_DIR / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"default tokenizer not found at {DEFAULT_DIR / 'tokenizer.json'}; it ships in "
                f"the repository's tokenizer/default and in a wheel's mmssl/_shipped (rebuild: "
                f"mmssl tokenizer train --default), or pass a path"
            )
        return _load_dir(str(DEFAULT_DIR), "default")
    if name_or_path == "clip":
        from mmssl.tokenizer.clip import open_clip_vocab_path

        return _load_file(str(open_clip_vocab_path()), "clip")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _load_dir(str(path.resolve()), str(name_or_path))
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer not found: {path} (expected 'default', 'clip', a tokenizer.json, "
            f"a sentencepiece .model, a CLIP .txt.gz or a directory holding one)"
        )
    path = path.resolve()
    beside = read_meta(path.parent)  # a file named by the meta beside it loads as its folder:
    if beside is not None and beside["artifact"] == path.name:  # its ids, its sha256 check
        return _load_dir(str(path.parent), str(name_or_path))
    return _load_file(str(path), str(name_or_path))


def read_meta(directory: str | Path) -> dict[str, Any] | None:
    """The parsed tokenizer_meta.json of a directory, or None when there is none."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in ("artifact", "kind", "bos_id", "eos_id", "pad_id") if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    artifact = meta["artifact"]
    # a bare file name next to the meta: anything else would be read from elsewhere (or crash)
    if not isinstance(artifact, str) or not artifact or Path(artifact).name != artifact:
        raise ValueError(
            f"{path}: 'artifact' must be a file name in {path.parent}, got {artifact!r}"
        )
    if not isinstance(meta["kind"], str):
        raise ValueError(f"{path}: 'kind' must be a string, got {meta['kind']!r}")
    for key in ("bos_id", "eos_id", "pad_id"):
        # bool is an int subclass, and "1" would be silently converted: both are typos
        if isinstance(meta[key], bool) or not isinstance(meta[key], int):
            raise ValueError(f"{path}: {key!r} must be an integer, got {meta[key]!r}")
    tokens = meta.get("special_tokens", {})
    if not isinstance(tokens, dict) or not all(isinstance(t, str) for t in tokens.values()):
        raise ValueError(f"{path}: 'special_tokens' must map roles to strings, got {tokens!r}")
    return meta


def save_tokenizer(tok: Tokenizer, directory: str | Path) -> Path:
    """Copy `tok`'s file into `directory` with a tokenizer_meta.json naming it, so that
    `get_tokenizer(directory)` gives the same tokenizer (ids, special ids, sha256) wherever
    the directory goes; `mmssl export` puts the run's tokenizer beside the weights this way.
    A meta beside the source file is kept (its provenance), with the new file's name.  The
    file is checked against `tok.sha256` after the copy: a file changed since `tok` loaded
    is a ValueError, and nothing is replaced.  Returns the meta file's path."""
    from mmssl.atomic import replace_together, write_atomic

    suffix = ".txt.gz" if tok.path.name.endswith(".txt.gz") else tok.path.suffix
    if suffix not in SAVED_NAMES:
        raise ValueError(f"cannot save tokenizer file {tok.path}: unknown type {suffix!r}")
    out = Path(directory).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    target = out / SAVED_NAMES[suffix]
    meta: dict[str, Any] = {}
    source_meta = tok.path.parent / META_FILE
    if source_meta.is_file():
        found = read_meta(tok.path.parent)
        if found is not None and found["artifact"] == tok.path.name:
            meta = found
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    try:
        tokens = {role: tok.id_to_token(i) for role, i in ids.items()}
    except NotImplementedError:  # CLIP's: its ids are fixed by its vocabulary file
        tokens = {}
    meta.update(
        format=META_FORMAT,
        artifact=target.name,
        kind=tok.kind,
        vocab_size=tok.vocab_size,
        sha256=tok.sha256,
        special_tokens={role: t for role, t in tokens.items() if t is not None},
        **{f"{role}_id": i for role, i in ids.items()},
    )
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    if target.resolve() == tok.path.resolve():
        write_atomic(out / META_FILE, text)
        return out / META_FILE

    def copy(tmp: Path) -> None:
        tmp.write_bytes(tok.path.read_bytes())
        if sha256_file(tmp) != tok.sha256:
            raise ValueError(
                f"{tok.path} changed since its tokenizer loaded (sha256 {tok.sha256}); "
                f"not saved to {out}"
            )

    # the meta last: never an old meta beside a new file
    replace_together([(target, copy), (out / META_FILE, text)])
    return out / META_FILE


def _load_dir(directory: str, name: str) -> Tokenizer:
    folder = Path(directory)
    meta = read_meta(folder)
    if meta is None:
        found = sorted(p for pattern in ARTIFACTS for p in folder.glob(pattern))
        if len(found) != 1:
            what = "no tokenizer file" if not found else f"{len(found)} tokenizer files"
            raise FileNotFoundError(
                f"{folder}: {what} ({', '.join(ARTIFACTS)}) and no {META_FILE}"
                + _named_by_config(folder)
            )
        return _load_file(str(found[0]), name)
    artifact = folder / meta["artifact"]
    if not artifact.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {artifact} (named in {META_FILE})")
    if "sha256" in meta and sha256_file(artifact) != meta["sha256"]:
        raise ValueError(f"{artifact}: sha256 differs from {folder / META_FILE}; file changed?")
    return _load_file(str(artifact), name, json.dumps(meta, sort_keys=True))


def _named_by_config(folder: Path) -> str:
    """The hint for a model folder without a tokenizer copy (`save_pretrained` of an import
    writes none, `mmssl export` does) whose config.json names its tokenizer."""
    try:
        name = json.loads((folder / "config.json").read_text(encoding="utf-8"))["tokenizer"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return f"; its config.json names tokenizer {name!r}: get_tokenizer({name!r})" if name else ""


def _load_file(path: str, name: str, meta_json: str | None = None) -> Tokenizer:
    stat = Path(path).stat()
    return _cached(path, name, meta_json, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _cached(path: str, name: str, meta_json: str | None, mtime_ns: int, size: int) -> Tokenizer:
    # mtime and size are in the key so an edited file is re-read
    meta = json.loads(meta_json) if meta_json else None
    if path.endswith(".txt.gz"):
        from mmssl.tokenizer.clip import CLIPTokenizer

        clip = CLIPTokenizer(path, name=name)
        fixed = {f"{role}_id": getattr(clip, f"{role}_id") for role in ("bos", "eos", "pad")}
        wrong = {k: meta[k] for k in fixed if meta is not None and meta[k] != fixed[k]}
        if wrong:  # a meta's other ids were ignored without a word
            raise ValueError(
                f"{Path(path).parent / META_FILE}: {wrong} differ from CLIP's {fixed}, which "
                "its vocabulary fixes"
            )
        tok: Tokenizer = clip
    elif path.endswith(".model"):
        from mmssl.tokenizer.spm import SentencePieceTokenizer

        tok = SentencePieceTokenizer(path, name=name, meta=meta)
    elif path.endswith(".json"):
        from mmssl.tokenizer.hf import HFTokenizer

        tok = HFTokenizer(path, name=name, meta=meta)
    else:
        raise ValueError(f"unknown tokenizer file type: {path} (expected .json, .model or .txt.gz)")
    if meta is not None:
        _check_meta_matches(tok, meta)
    return tok


def _check_meta_matches(tok: Tokenizer, meta: dict[str, Any]) -> None:
    """The artifact must agree with its tokenizer_meta.json (already type-checked by read_meta)."""
    where = tok.path.parent / META_FILE
    if meta["kind"] != tok.kind:
        raise ValueError(f"{where}: kind {meta['kind']!r} but {tok.path.name} is {tok.kind!r}")
    if meta.get("vocab_size", tok.vocab_size) != tok.vocab_size:
        raise ValueError(
            f"{tok.path}: vocab_size {tok.vocab_size} differs from {META_FILE} ({meta['vocab_size']})"
        )
    tokens = meta.get("special_tokens", {})
    for role in ("bos", "eos", "pad"):
        idx = meta[f"{role}_id"]
        # an id outside the embedding table would only fail later, deep inside a model
        if not 0 <= idx < tok.vocab_size:
            raise ValueError(
                f"{where}: {role}_id {idx} is outside the vocabulary [0, {tok.vocab_size})"
            )
        if role in tokens and tok.id_to_token(idx) != tokens[role]:
            raise ValueError(
                f"{where}: {role}_id {idx} is {tok.id_to_token(idx)!r} in {tok.path.name}, "
                f"but special_tokens.{role} is {tokens[role]!r}"
            )


if not TYPE_CHECKING:  # `mmssl.tokenizer.MODULE` imports it (mmssl/__init__.py)
    __getattr__ = _submodule_attributes(__name__, __path__)
