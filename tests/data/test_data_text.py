"""Caption tokenisation and LM packing across document boundaries."""

from __future__ import annotations

import torch
from data_helpers import StubTokenizer

from mmssl.data.text import TokenPacker, tokenize_captions


def _docs(n: int) -> list[tuple[str, str]]:
    return [(f"d{i}", "ab" * (1 + (7 * i) % 11)) for i in range(n)]


def _stream(docs):
    it = iter(range(len(docs)))

    def next_doc():
        i = next(it)
        return docs[i][0], docs[i][1], {"next": i}, (0, None)

    return next_doc


def test_packing_matches_naive_concatenation():
    tok, docs = StubTokenizer(), _docs(30)
    flat: list[int] = []
    for _, text in docs:
        flat += tok.encode(text) + [tok.eos_id]
    packer = TokenPacker(tok, context_length=9)
    rows, keys = packer.pack(4, _stream(docs))
    ref = torch.tensor(flat[: 4 * 10]).view(4, 10)
    assert torch.equal(rows, ref)
    assert (rows == tok.eos_id).sum() >= 2  # rows span document boundaries
    assert keys[0] == "d0"


def test_packer_state_resumes_mid_document():
    tok, docs = StubTokenizer(), _docs(40)
    full = TokenPacker(tok, context_length=5)
    nd = _stream(docs)
    ref = [full.pack(2, nd)[0] for _ in range(8)]

    a = TokenPacker(tok, context_length=5)
    pos = {"i": 0}

    def next_doc():
        i = pos["i"]
        pos["i"] += 1
        return docs[i][0], docs[i][1], i, (0, None)  # the "stream state" before doc i is i

    for _ in range(3):
        a.pack(2, next_doc)
    state = a.state(pos["i"])
    b = TokenPacker(tok, context_length=5)
    pos["i"] = b.load_state(state)
    got = [b.pack(2, next_doc)[0] for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(got, ref[3:]))


def test_tokenize_captions_with_default_tokenizer(tokenizer):
    ids, mask = tokenize_captions(tokenizer, ["a red seven.", "the digit two in blue."], 12)
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == torch.int64
    assert mask.dtype == torch.bool and mask.sum(1).tolist()[0] < 12
    assert ids[0, 0].item() == tokenizer.bos_id
    n = int(mask[0].sum())
    assert ids[0, n - 1].item() == tokenizer.eos_id and (ids[0, n:] == tokenizer.pad_id).all()
    inner = tokenizer.encode("a red seven.", add_bos=False, add_eos=False)
    assert ids[0, 1 : n - 1].tolist() == list(inner)


def test_a_slots_cut_last_document_is_never_followed_by_another(demo_data):
    """In epoch mode a text slot's run ends inside its last document (no eos: the rest is the
    next slot's).  The block shuffle put that piece mid-window, straight into the next
    document with no eos between them: a junction no text has, once per slot and epoch."""
    import glob
    import tarfile

    from mmssl.data.pipeline import Source, build_pipeline
    from mmssl.tokenizer import get_tokenizer

    tok = get_tokenizer("default")
    docs = []
    for path in sorted(glob.glob(f"{demo_data}/text/train-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".txt"):
                    text = tar.extractfile(m).read().decode("utf-8").strip()  # type: ignore[union-attr]
                    docs.append(tok.encode(text, add_bos=False, add_eos=False))
    starts = {tuple(d[:8]) for d in docs}  # a document begins with these tokens
    cuts = 0
    for world in (1, 2):
        for rank in range(world):
            pl = build_pipeline(
                sources=[Source(f"{demo_data}/text/train-{{000000..000008}}.tar", kind="text", name="docs")],
                batch_size=4, mode="epoch", seed=0, rank=rank, world_size=world, tokenizer=tok,
                context_length=63, shuffle=256,
            )  # fmt: skip
            stream = [t for b in pl for row in b["text"].tolist() for t in row]
            pieces, cur = [], []
            for t in stream:
                if t == tok.eos_id:
                    pieces.append(cur)
                    cur = []
                else:
                    cur.append(t)
            for piece in pieces:  # a whole document, or one that starts mid-piece: a junction
                whole = any(piece == d for d in docs)
                inside = any(tuple(piece[i : i + 8]) in starts for i in range(1, len(piece) - 8))
                cuts += not whole and inside
    assert cuts == 0
