"""The streaming pipeline: batch layout, exact resume (2 ranks x 2 workers, both modes),
epoch accounting, mixing, pre-flight errors."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from data_helpers import StubTokenizer, png_bytes

from mmssl.data.errors import DataError
from mmssl.data.pipeline import Source, build_pipeline
from mmssl.data.shards import ShardWriter


def _take(loader, n: int) -> list[dict]:
    """n batches, continuing into the next epoch when one ends (epoch mode)."""
    out: list[dict] = []
    while len(out) < n:
        before = len(out)
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
        if len(out) == before:
            raise AssertionError("empty epoch")
    return out


def _sig(batch: dict) -> tuple:
    views = tuple(v.sum().item() for v in batch.get("views", []))
    text = batch["text"].sum().item() if "text" in batch else 0
    return tuple(batch["__key__"]), views, text


def test_batch_layout(image_shards, tokenizer):
    pl = build_pipeline(
        image_shards,
        batch_size=5,
        rank=0,
        world_size=1,
        image_size=12,
        tokenizer=tokenizer,
        context_length=16,
        json_fields=("label", "index"),
        shuffle=10,
    )
    b = next(iter(pl))
    assert b["image"].shape == (5, 3, 12, 12) and b["image"].dtype == torch.float32
    assert len(b["views"]) == 2 and b["views"][1].shape == (5, 3, 12, 12)
    assert len(b["aug"]) == 2 and b["aug"][0].shape == (5, 13)
    assert b["text"].shape == (5, 16) and b["text"].dtype == torch.int64
    assert b["text_mask"].dtype == torch.bool and b["text_mask"][:, 0].all()
    assert b["label"].dtype == torch.int64 and b["label"].shape == (5,)
    ids = [int(k[1:]) for k in b["__key__"]]
    assert b["index"].tolist() == ids and b["label"].tolist() == [i % 3 for i in ids]
    assert b["caption"] == [f"sample number {i}" for i in ids]
    assert ids == [int(c.split()[-1]) for c in b["caption"]]
    assert 0 <= b["views"][0].min() and b["views"][0].max() <= 1


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["resampled", "epoch"])
def test_exact_resume_two_ranks_two_workers(image_shards, mode):
    """Keys and view tensors after a restore equal the uninterrupted run, per rank."""
    # 48 samples, world 2, batch 4 -> 6 batches per rank and epoch; 9 crosses an epoch
    kw = dict(
        batch_size=4,
        mode=mode,
        seed=3,
        shuffle=5,
        world_size=2,
        num_workers=2,
        image_size=8,
        return_image=False,
        json_fields=("index",),
    )
    for rank in (0, 1):
        full = build_pipeline(image_shards, rank=rank, **kw)
        ref = [_sig(b) for b in _take(full, 9)]
        for cut in (3, 7):  # inside the first epoch, inside the second
            head = build_pipeline(image_shards, rank=rank, **kw)
            assert [_sig(b) for b in _take(head, cut)] == ref[:cut]
            state = head.state_dict()
            assert json.loads(json.dumps(state)) == state  # checkpoint-safe plain data
            assert state["workers"] and set(state["workers"]) <= {"0", "1"}
            tail = build_pipeline(image_shards, rank=rank, **kw)
            tail.load_state_dict(state)
            assert [_sig(b) for b in _take(tail, 9 - cut)] == ref[cut:], (rank, cut)


def test_epoch_mode_equal_counts_and_disjoint_ranks(image_shards):
    keys = {}
    for rank in (0, 1):
        pl = build_pipeline(
            image_shards,
            batch_size=4,
            mode="epoch",
            rank=rank,
            world_size=2,
            num_workers=0,
            image_size=8,
            num_views=0,
            shuffle=7,
        )
        batches = list(pl)
        assert len(batches) == len(pl) == 48 // (2 * 4)
        keys[rank] = [k for b in batches for k in b["__key__"]]
    assert len(set(keys[0])) == len(keys[0]) == 24
    assert not set(keys[0]) & set(keys[1])  # each rank reads its own shards


@pytest.mark.parametrize("mode", ["resampled", "epoch"])
def test_mixed_sources_with_lm_resume(image_shards, tmp_path, mode):
    from mmssl.data.shards import write_shards

    docs = ({"__key__": f"d{i}", "txt": "word " * (3 + 7 * i)} for i in range(12))
    write_shards(docs, str(tmp_path), "lm", max_count=3, progress=False)
    tok = StubTokenizer()
    kw = dict(
        sources=[
            Source(image_shards, name="img", weight=1.0),
            Source(str(tmp_path / "lm-{000000..000003}.tar"), kind="text", name="lm", weight=3.0),
        ],
        batch_size=3,
        mode=mode,
        seed=1,
        shuffle=4,
        rank=1,
        world_size=2,
        num_workers=0,
        image_size=8,
        tokenizer=tok,
        context_length=10,
    )
    ref = _take(build_pipeline(**kw), 14)  # epoch mode: 8 image + 25 text batches an epoch
    names = [b["source"] for b in ref]
    assert names.count("lm") > names.count("img") > 0
    lm = next(b for b in ref if b["source"] == "lm")
    assert lm["text"].shape == (3, 11) and lm["text_mask"].all()
    head = build_pipeline(**kw)
    _take(head, 6)
    tail = build_pipeline(**kw)
    tail.load_state_dict(head.state_dict())
    assert [_sig(b) for b in _take(tail, 8)] == [_sig(b) for b in ref[6:]]


def test_resampled_mode_is_infinite_and_seeded(image_shards):
    kw = dict(batch_size=8, rank=0, world_size=1, image_size=8, num_views=1, shuffle=3)
    a = [_sig(b) for b in itertools.islice(build_pipeline(image_shards, seed=1, **kw), 10)]
    b = [_sig(b) for b in itertools.islice(build_pipeline(image_shards, seed=1, **kw), 10)]
    c = [_sig(b) for b in itertools.islice(build_pipeline(image_shards, seed=2, **kw), 10)]
    assert a == b and a != c and len(a) == 10  # 80 samples from 48: resampling repeats


def test_preflight_errors(image_shards, tmp_path):
    with pytest.raises(DataError, match="resampled"):
        build_pipeline(
            image_shards, batch_size=2, mode="epoch", rank=0, world_size=3, num_workers=3
        )
    with pytest.raises(DataError, match="matches no file"):
        build_pipeline(str(tmp_path / "nope-{000..003}.tar"), batch_size=2, rank=0, world_size=1)
    with pytest.raises(DataError, match="do not exist"):
        build_pipeline(image_shards.replace("000007", "000009"), batch_size=2, rank=0, world_size=1)
    with pytest.raises(DataError, match="needs a tokenizer"):
        build_pipeline(
            sources=[Source(image_shards, kind="text")], batch_size=2, rank=0, world_size=1
        )
    with pytest.raises(DataError, match="smaller than one batch"):
        build_pipeline(image_shards, batch_size=100, mode="epoch", rank=0, world_size=1)


def test_state_from_other_layout_is_refused(image_shards):
    a = build_pipeline(image_shards, batch_size=2, rank=0, world_size=2, num_workers=0)
    b = build_pipeline(image_shards, batch_size=2, rank=0, world_size=2, num_workers=2)
    with pytest.raises(DataError, match="num_workers"):
        b.load_state_dict(a.state_dict())
    # a changed shuffle window or shard list would restore a position that is no continuation
    kw = dict(batch_size=2, rank=0, world_size=1)
    saved = build_pipeline(image_shards, shuffle=5, **kw).state_dict()
    with pytest.raises(DataError, match="shuffle"):
        build_pipeline(image_shards, shuffle=50, **kw).load_state_dict(saved)
    fewer = image_shards.replace("000007", "000006")
    # the message names the field that changed: 8 shards were 7
    with pytest.raises(DataError, match="source 'source0': shard count 8 when saved, 7 now;"):
        build_pipeline(fewer, shuffle=5, **kw).load_state_dict(saved)
    build_pipeline(image_shards, shuffle=5, **kw).load_state_dict(saved)  # the same: accepted
    # an epoch's length in batches (here set; a text source's context length moves it too)
    ep = dict(kw, shuffle=5, mode="epoch")
    saved = build_pipeline(sources=[Source(image_shards, epoch_batches=3)], **ep).state_dict()
    with pytest.raises(DataError, match="epoch length in batches 3 when saved, 4 now;") as info:
        build_pipeline(sources=[Source(image_shards, epoch_batches=4)], **ep).load_state_dict(saved)
    assert "shard count" not in str(info.value)


def test_resampled_sources_of_equal_shard_counts_draw_their_own_shards(image_shards):
    # the draws of every source used to come from one RNG stream: two sources over the same
    # 8 shards read the same shards in the same order
    sources = [Source(image_shards, name="a"), Source(image_shards, name="b")]
    kw = dict(batch_size=6, rank=0, world_size=1, shuffle=1, image_size=8, num_views=0)
    draws: dict[str, list[int]] = {"a": [], "b": []}
    for batch in _take(build_pipeline(sources=sources, **kw), 60):
        shards = {int(k[1:]) // 6 for k in batch["__key__"]}  # 6 samples: one whole shard
        assert len(shards) == 1
        draws[batch["source"]].extend(shards)
    n = min(len(d) for d in draws.values())
    same = sum(x == y for x, y in zip(draws["a"][:n], draws["b"][:n]))
    assert n >= 20 and same < n / 3  # independent draws from 8 shards agree 1 time in 8


def test_version_2_states_load_where_the_stream_is_unchanged(image_shards):
    kw = dict(batch_size=2, rank=0, world_size=1, shuffle=3, image_size=8, num_views=0)
    for mode in ("resampled", "epoch"):  # one source: its draws are those of version 2
        head = build_pipeline(image_shards, mode=mode, **kw)
        _take(head, 3)
        saved = {**head.state_dict(), "version": 2}
        want = [_sig(b) for b in _take(head, 4)]
        tail = build_pipeline(image_shards, mode=mode, **kw)
        tail.load_state_dict(saved)
        assert [_sig(b) for b in _take(tail, 4)] == want
    # a resampled mixture: version 2 drew other shards for the second source
    sources = [Source(image_shards, name="a"), Source(image_shards, name="b")]
    mixed = build_pipeline(sources=sources, **kw)
    _take(mixed, 3)
    saved = {**mixed.state_dict(), "version": 2}
    with pytest.raises(DataError, match="version 2 .* resampled mixture"):
        build_pipeline(sources=sources, **kw).load_state_dict(saved)
    with pytest.raises(DataError, match="version=1"):
        build_pipeline(image_shards, **kw).load_state_dict({**saved, "version": 1})


def test_version_2_and_3_states_with_views_are_refused(image_shards):
    """Version 4 draws a batch's view parameters in one generator call: a state of versions
    2 and 3 would continue with other views, unless the pipeline draws none."""
    kw = dict(batch_size=2, rank=0, world_size=1, shuffle=3, image_size=8)
    head = build_pipeline(image_shards, num_views=2, **kw)
    _take(head, 2)
    for old in (2, 3):
        saved = {**head.state_dict(), "version": old}
        with pytest.raises(DataError, match=f"version {old} .* other augmented views"):
            build_pipeline(image_shards, num_views=2, **kw).load_state_dict(saved)
    plain = build_pipeline(image_shards, num_views=0, **kw)
    _take(plain, 2)
    saved = {**plain.state_dict(), "version": 3}
    want = [_sig(b) for b in _take(plain, 3)]
    tail = build_pipeline(image_shards, num_views=0, **kw)
    tail.load_state_dict(saved)
    assert [_sig(b) for b in _take(tail, 3)] == want


def test_state_after_an_epochs_last_batch_resumes_with_the_next_epoch(image_shards):
    kw = dict(batch_size=2, rank=0, world_size=1, mode="epoch", shuffle=3)
    head = build_pipeline(image_shards, **kw)
    for i, _ in enumerate(head, 1):
        if i == len(head):
            saved = head.state_dict()  # a checkpoint after the epoch's last step
    second = [k for b in head for k in b["__key__"]]
    tail = build_pipeline(image_shards, **kw)
    tail.load_state_dict(saved)
    assert [k for b in tail for k in b["__key__"]] == second


def test_sources_of_one_run_draw_independent_views(image_shards):
    # a run builds one pipeline per source with the same seed: batch i of two image sources
    # must not share crops, flips and jitter
    kw = dict(batch_size=4, rank=0, world_size=1, image_size=8, num_views=2, return_image=False)
    a = next(iter(build_pipeline(sources=[Source(image_shards, name="a")], **kw)))
    b = next(iter(build_pipeline(sources=[Source(image_shards, name="b")], **kw)))
    a2 = next(iter(build_pipeline(sources=[Source(image_shards, name="a")], **kw)))
    crop = slice(8, 12)  # crop centre and size: independent of the image content
    assert torch.equal(a["aug"][0], a2["aug"][0])
    assert not torch.equal(a["aug"][0][:, crop], b["aug"][0][:, crop])


def test_epoch_mode_with_uneven_shards_repeats_no_sample(tmp_path):
    # 50 samples in shards of 7 (the last holds 1): by whole shards, 2 ranks x 2 workers
    # would leave one slot 8 samples for its 12 and another 14; split by samples, every key
    # comes once and only the remainder short of a batch per rank is dropped
    w = ShardWriter(str(tmp_path), "u", max_count=7)
    for i in range(50):
        w.write({"__key__": f"u{i:03d}", "png": png_bytes(np.zeros((8, 8, 3), np.uint8))})
    w.close()
    keys = []
    for rank in range(2):
        pl = build_pipeline(
            str(tmp_path / w.pattern),
            kind="image",
            batch_size=4,
            mode="epoch",
            rank=rank,
            world_size=2,
            num_workers=2,
            image_size=8,
            num_views=0,
            shuffle=5,
        )
        assert len(pl) == 6  # 50 // (2 x 4)
        keys += [k for b in pl for k in b["__key__"]]
    assert len(keys) == 48 and len(set(keys)) == 48


class _CodeTokenizer(StubTokenizer):
    """One token per character, its code point: every character below is its own token."""

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return [ord(c) for c in text]


def test_text_epoch_reads_every_token_once(tmp_path):
    # 30 documents of uneven lengths in 8 shards (the last holds 2), 2 ranks x 2 workers,
    # every character unique: the slots cut the epoch's tokens into stretches (sharing the
    # documents at the cuts), so no token is read twice and only the remainder short of a
    # row is left
    from mmssl.data.shards import write_shards

    lengths = [(7 * i) % 23 + 1 for i in range(30)]
    texts = ["".join(chr(0x4E00 + 100 * i + j) for j in range(n)) for i, n in enumerate(lengths)]
    write_shards(
        ({"__key__": f"d{i}", "txt": t} for i, t in enumerate(texts)),
        str(tmp_path),
        "lm",
        max_count=4,
        progress=False,
    )
    tok = _CodeTokenizer()
    kw = dict(
        kind="text",
        batch_size=2,
        mode="epoch",
        seed=4,
        shuffle=3,
        world_size=2,
        num_workers=2,
        tokenizer=tok,
        context_length=9,
    )
    urls = str(tmp_path / "lm-{000000..000007}.tar")
    total = sum(lengths) + len(lengths)  # with an eos each: 391
    read: list[int] = []
    for rank in range(2):
        batches = list(build_pipeline(urls, rank=rank, **kw))
        assert len(batches) == total // 10 // (2 * 2) == 9  # of 2 rows of 10 tokens
        read += [t for b in batches for t in b["text"].flatten().tolist()]
        head = build_pipeline(urls, rank=rank, **kw)
        _take(head, 5)
        tail = build_pipeline(urls, rank=rank, **kw)
        tail.load_state_dict(head.state_dict())
        assert [_sig(b) for b in _take(tail, 4)] == [_sig(b) for b in batches[5:]]
    chars = [t for t in read if t != tok.eos_id]
    assert len(chars) == len(set(chars))  # no token twice
    assert len(read) == 360 and len(chars) >= sum(lengths) - (total - 360)


def test_text_source_skip_counts_survive_a_resume_at_every_cut(tmp_path):
    # one-document shards and an empty one, no shuffle: a resumed run reports the skips of
    # the uninterrupted one, whichever batch it was cut after (the packer re-reads the
    # document it was in, and the window refill that reads it must not count again)
    import tarfile

    from mmssl.data.shards import write_shards

    docs = ({"__key__": f"d{i}", "txt": "word " * 10} for i in range(2))
    write_shards(docs, str(tmp_path), "lm", max_count=1, progress=False)
    tarfile.open(tmp_path / "lm-000002.tar", "w").close()
    kw = dict(
        kind="text",
        batch_size=1,
        mode="resampled",
        shuffle=1,
        rank=0,
        world_size=1,
        tokenizer=StubTokenizer(),
        context_length=9,
    )
    urls = str(tmp_path / "lm-{000000..000002}.tar")

    def counts(loader, n: int) -> list[int]:  # the count after each of n batches
        it, out = iter(loader), []
        for _ in range(n):
            next(it)
            out.append(loader.skipped.get("empty_shard", 0))
        return out

    ref = counts(build_pipeline(urls, **kw), 30)
    assert ref[-1] > ref[0]
    for cut in range(1, 29):
        head = build_pipeline(urls, **kw)
        counts(head, cut)
        tail = build_pipeline(urls, **kw)
        tail.load_state_dict(head.state_dict())
        assert counts(tail, 30 - cut) == ref[cut:], cut


def test_epoch_order_changes_with_epoch() -> None:
    """Each epoch deals the shards in a new order (a fixed order replayed epoch 0)."""
    from mmssl.data.stream import epoch_order

    assert not np.array_equal(epoch_order(0, 0, 32), epoch_order(0, 1, 32))
    assert sorted(epoch_order(0, 1, 32)) == list(range(32))


def test_whole_shard_epoch_slots_are_disjoint() -> None:
    """Epoch mode without sample counts deals whole shards: the 2 ranks x 2 workers read
    each of 8 shards exactly once."""
    from mmssl.data.stream import ShardSequence

    seen = []
    for rank in range(2):
        for worker in range(2):
            seq = ShardSequence(
                8, mode="epoch", seed=0, epoch=0, rank=rank, world_size=2,
                worker=worker, num_workers=2,
            )  # fmt: skip
            seen += seq.mine
    assert sorted(seen) == list(range(8))


@pytest.mark.parametrize("one_shard", [False, True], ids=["shards", "one shard"])
def test_each_epoch_is_reshuffled(image_shards: str, one_shard: bool) -> None:
    """Two epochs hold the same samples in different orders, also from a single shard,
    where only the shuffle window's seed can change the order."""
    import glob
    import re

    urls = sorted(glob.glob(re.sub(r"\{.*\}", "*", image_shards)))[0] if one_shard else image_shards
    pl = build_pipeline(
        urls, batch_size=2, mode="epoch", rank=0, world_size=1, num_workers=0,
        image_size=8, num_views=0, shuffle=100,
    )  # fmt: skip
    e0 = [k for b in pl for k in b["__key__"]]
    e1 = [k for b in pl for k in b["__key__"]]
    assert sorted(e0) == sorted(e1) and e0 != e1
