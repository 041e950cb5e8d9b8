"""Bad documents of a text (LM) source in epoch mode are counted wherever the epoch's
order puts them: first, between two slots' runs, last.  Reference: the data itself, which
holds one bad document inside the tokens an epoch reads."""

from __future__ import annotations

import pytest
from data_helpers import StubTokenizer

from mmssl.data.pipeline import build_pipeline
from mmssl.data.shards import ShardWriter


def _text_shards(tmp_path, n: int, bad_at: int, text: str, per_shard: int) -> str:
    """n documents of `text`, `per_shard` a shard; document `bad_at` has no text."""
    w = ShardWriter(str(tmp_path), "t", max_count=per_shard)
    for i in range(n):
        w.write(
            {"__key__": f"d{i}", "json": {}} if i == bad_at else {"__key__": f"d{i}", "txt": text}
        )
    w.close()
    last = (n - 1) // per_shard
    return str(tmp_path / (f"t-{{000000..{last:06d}}}.tar" if last else "t-000000.tar"))


@pytest.mark.parametrize("bad_at", [0, 3, 9])
def test_every_bad_document_of_a_text_epoch_is_counted(tmp_path, bad_at):
    """10 documents of 5 tokens (eos included) but one without text: 45 tokens = exactly 5
    rows of 9, every token of the epoch is read.  Reference: the data holds one
    missing_text document, inside the epoch's tokens, so an epoch counts 1, wherever it
    lies (an image source counts its bad samples wherever they are)."""
    url = _text_shards(tmp_path, 10, bad_at, "abcd", per_shard=10)
    pl = build_pipeline(url, kind="text", batch_size=1, mode="epoch", rank=0, world_size=1,
                        num_workers=0, tokenizer=StubTokenizer(), context_length=8, shuffle=1)  # fmt: skip
    assert len(list(pl)) == 5
    assert pl.skipped == {"missing_text": 1}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_bad_document_between_two_ranks_or_at_the_epoch_end_is_counted(tmp_path, seed):
    """Shards of 10 and 9 documents of 3 tokens; document 9, the first shard's last, has no
    text: 54 tokens, rows of 9, 2 ranks x 3 rows, rank 0 reads tokens [0, 27), rank 1 [27,
    54).  The first shard read first puts the bad document at token 27, between the ranks'
    runs; read second, at 54, the epoch's end.  Reference: 1 bad document in the epoch's
    tokens, counted once over the ranks, whichever order the seed gives."""
    url = _text_shards(tmp_path, 19, 9, "ab", per_shard=10)
    total: dict[str, int] = {}
    for rank in range(2):
        pl = build_pipeline(url, kind="text", batch_size=1, mode="epoch", rank=rank,
                            world_size=2, num_workers=0, tokenizer=StubTokenizer(),
                            context_length=8, shuffle=1, seed=seed)  # fmt: skip
        assert len(list(pl)) == 3
        for k, n in pl.skipped.items():
            total[k] = total.get(k, 0) + n
    assert total == {"missing_text": 1}
