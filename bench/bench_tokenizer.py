"""Batch-encode throughput (texts/s) of the mmssl tokenizers against the libraries they wrap.

    python bench/bench_tokenizer.py [--num-texts 4096] [--repeats 7] [--context-length 77]

Measured in one process, on the same texts, each the median of --repeats timed calls, the
two sides' calls alternated, by wall clock and by CPU time:
- mmssl default byte-level BPE `batch_encode` vs the raw `tokenizers` calls
  (`encode_batch_fast` to id lists, and `encode_batch` with Rust-side truncation/padding
  turned into a tensor);
- mmssl sentencepiece `batch_encode` vs raw `SentencePieceProcessor.encode` (a unigram
  model trained here on the default corpus);
- mmssl CLIP `batch_encode` vs `open_clip.tokenize`, on caption-like text and on a
  Unicode-heavy mix (the CLIP parity test's texts).
Ratios > 1 mean mmssl is faster.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from mmssl.cliargs import summary


def caption_like_texts(n: int, seed: int = 0) -> list[str]:
    """Demo captions and pydoc sentences (<= 300 characters), shuffled."""
    from pydoc_data.topics import topics

    from mmssl.data.captions import caption_corpus

    sentences = [
        s.strip()[:300]
        for k in sorted(topics)
        for s in topics[k].replace("\n", " ").split(". ")
        if len(s.strip()) > 10
    ]
    pool = caption_corpus() + sentences
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(n)]


def paired_rates(
    ours: Callable[[], object], ref: Callable[[], object], n: int, repeats: int
) -> tuple[float, float, float, float]:
    """Texts/s of `ours` and `ref` by wall clock, then by CPU time (process_time: every
    thread, so a 2-thread Rust call is charged both cores), each the median of `repeats`
    calls, the two alternated (the order flipped every repeat) so that load drifts hit both."""
    ours(), ref()  # warm caches (BPE word caches, lazy imports)
    wall: dict[str, list[float]] = {"ours": [], "ref": []}
    cpu: dict[str, list[float]] = {"ours": [], "ref": []}
    for i in range(repeats):
        pair = [("ours", ours), ("ref", ref)]
        for name, fn in pair if i % 2 == 0 else pair[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    rate = {k: n / statistics.median(v) for k, v in wall.items()}
    cpu_rate = {k: n / max(statistics.median(v), 1e-9) for k, v in cpu.items()}
    return rate["ours"], rate["ref"], cpu_rate["ours"], cpu_rate["ref"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=summary(__doc__))
    p.add_argument("--num-texts", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--context-length", type=int, default=77)
    args = p.parse_args(argv)
    problem = common.args_problem(args, {"num_texts": 1, "repeats": 1, "context_length": 1})
    if problem:
        print(problem, file=sys.stderr)
        return 2
    n, r, T = args.num_texts, args.repeats, args.context_length

    import sentencepiece as spm
    import tokenizers
    import torch

    from mmssl.tokenizer import DEFAULT_DIR, get_tokenizer
    from mmssl.tokenizer.train import default_corpus, train_sentencepiece

    texts = caption_like_texts(n)
    rows: list[tuple[str, str, tuple[float, float, float, float]]] = []

    # byte-level BPE
    tok = get_tokenizer()
    raw = tokenizers.Tokenizer.from_file(str(DEFAULT_DIR / "tokenizer.json"))
    padded = tokenizers.Tokenizer.from_file(str(DEFAULT_DIR / "tokenizer.json"))
    padded.enable_truncation(T)
    padded.enable_padding(length=T, pad_id=tok.pad_id)

    def raw_padded() -> torch.Tensor:
        return torch.tensor([e.ids for e in padded.encode_batch_fast(texts)], dtype=torch.int64)

    def ours_default() -> object:
        return tok.batch_encode(texts, T)

    rows.append(("mmssl default batch_encode", "tokenizers encode_batch_fast (id lists)",
                 paired_rates(ours_default, lambda: raw.encode_batch_fast(texts, add_special_tokens=False), n, r)))  # fmt: skip
    rows.append(("mmssl default batch_encode", "tokenizers truncate+pad -> tensor",
                 paired_rates(ours_default, raw_padded, n, r)))  # fmt: skip

    # sentencepiece (trained here: the repo ships no .model)
    with tempfile.TemporaryDirectory() as tmp:
        train_sentencepiece(default_corpus(), tmp, vocab_size=8192, show_progress=False)
        sp_tok = get_tokenizer(tmp)
        sp = spm.SentencePieceProcessor(model_file=str(Path(tmp) / "tokenizer.model"))
        rows.append(("mmssl sentencepiece batch_encode", "sentencepiece encode (id lists)",
                     paired_rates(lambda: sp_tok.batch_encode(texts, T), lambda: sp.encode(texts), n, r)))  # fmt: skip

    # CLIP: importing open_clip's tokenizer sets TOKENIZERS_PARALLELISM=false for the whole
    # process; restore it so the other rows are not silently single-threaded
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_tokenizer_clip import load_open_clip_tokenizer, parity_texts

    oc = load_open_clip_tokenizer()
    if saved is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = saved
    clip = get_tokenizer("clip")
    mixed = (parity_texts(1200, seed=5) * (n // 1200 + 1))[:n]
    for label, batch in (("captions", texts), ("unicode mix", mixed)):
        assert torch.equal(clip.batch_encode(batch, 77)[0], oc.tokenize(batch))
        # a fresh open_clip tokenizer per timed call would be unfair: both keep word caches
        rows.append((f"mmssl clip batch_encode [{label}]", "open_clip.tokenize",
                     paired_rates(lambda b=batch: clip.batch_encode(b, 77), lambda b=batch: oc.tokenize(b), n, r)))  # fmt: skip

    print(f"{n} texts ({len(set(texts))} distinct captions), context_length {T}, median of {r} "
          f"alternated calls; torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM')}")  # fmt: skip
    print("the Rust tokenizers may use every core, open_clip's and sentencepiece's one: the CPU "
          "ratio (texts per CPU-second) compares work, the wall ratio what a caller waits")  # fmt: skip
    print(f"{'mmssl':<44} {'texts/s':>10}   {'reference':<44} {'texts/s':>10}  wall   CPU")
    for ours_name, ref_name, (ours_rate, ref_rate, ours_cpu, ref_cpu) in rows:
        print(f"{ours_name:<44} {ours_rate:>10,.0f}   {ref_name:<44} {ref_rate:>10,.0f}  "
              f"{ours_rate / ref_rate:5.2f}x {ours_cpu / ref_cpu:5.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
