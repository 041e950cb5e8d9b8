"""Text (LM) test data: a tokenizer whose tokens name (document, position), shards of
documents with bad ones, and the naive epoch they make."""

from __future__ import annotations

from mmssl.data.pipeline import build_pipeline
from mmssl.data.shards import ShardWriter
from mmssl.data.stream import epoch_order

EOS = 1


class DocTokenizer:
    """text "i:L" -> L tokens 1000*(i+1) + j, j < L: every token names its document."""

    eos_id = EOS
    pad_id = 0
    vocab_size = 10**7

    def encode(self, text, add_bos=False, add_eos=False):
        i, n = (int(x) for x in text.split(":"))
        return [1000 * (i + 1) + j for j in range(n)]

    def batch_encode(self, texts, context_length, add_bos=True, add_eos=True):
        raise NotImplementedError


def write_docs(path, lengths, bad, per_shard):
    """Documents i with lengths[i] tokens (+eos), those in `bad` without text."""
    w = ShardWriter(str(path), "t", max_count=per_shard)
    for i, n in enumerate(lengths):
        if i in bad:
            w.write({"__key__": f"d{i:04d}", "json": {}})
        else:
            w.write({"__key__": f"d{i:04d}", "txt": f"{i}:{n}"})
    w.close()
    last = (len(lengths) - 1) // per_shard
    return str(path / f"t-{{000000..{last:06d}}}.tar") if last else str(path / "t-000000.tar")


def shards_docs(lengths, per_shard):
    """Document indices of each shard."""
    n = len(lengths)
    return [list(range(s, min(s + per_shard, n))) for s in range(0, n, per_shard)]


def naive_epoch(lengths, bad, per_shard, seed, epoch):
    """The epoch's documents in order: list of (doc, tokens) (tokens [] for bad)."""
    shards = shards_docs(lengths, per_shard)
    out = []
    for s in epoch_order(seed, epoch, len(shards)):
        for d in shards[int(s)]:
            if d in bad:
                out.append((d, []))
            else:
                out.append((d, [1000 * (d + 1) + j for j in range(lengths[d])] + [EOS]))
    return out


def pipe(url, **kw):
    base = dict(kind="text", tokenizer=DocTokenizer())
    base.update(kw)
    return build_pipeline(url, **base)
