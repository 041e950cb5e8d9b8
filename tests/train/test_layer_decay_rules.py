"""optim.layer_decay: the multipliers of CLIP (a pre-norm too), shared-trunk and CoCa models
equal a naive per-name computation of the documented rule (timm's own on a ViT:
tests/train/test_layer_decay.py)."""

from __future__ import annotations

import re

import pytest

import mmssl
from mmssl.train.layer_decay import layer_scales

BLOCK = re.compile(r"^(?P<stack>.+)\.blocks\.(?P<i>\d+)\.")


def _naive(model, d):
    """The rule as the docs state it, computed independently: depth = number of distinct
    block indices of a stack; a tower's embeddings at d^(its depth + 1) (a tower without a
    stack of its own: the shared one); everything else at 1."""
    names = [n for n, _ in model.named_parameters()]
    t = model.cfg.text
    tied = t is not None and t.lm_head and t.tie_embeddings  # the table is the LM head too
    blocks: dict[str, set[int]] = {}
    for n in names:
        if m := BLOCK.match(n):
            blocks.setdefault(m["stack"], set()).add(int(m["i"]))
    depth = {s: len(ix) for s, ix in blocks.items()}
    out = {}
    for n in names:
        if tied and n == "text.token_embed.weight":
            out[n] = 1.0  # trains as the head
        elif m := BLOCK.match(n):
            out[n] = d ** (depth[m["stack"]] - int(m["i"]))
        elif any(part in ("patch_embed", "cls_token", "pos_embed", "token_embed", "norm_pre")
                 for part in n.split(".")):  # fmt: skip
            tower = n.split(".")[0]
            own = [v for s, v in depth.items() if s.split(".")[0] == tower]
            (shared,) = own or list(depth.values())  # one stack a tower in these models
            out[n] = d ** (shared + 1)
        else:
            out[n] = 1.0
    return out


@pytest.mark.parametrize(
    ("name", "over"),
    [
        ("test_tiny_clip", {"vision.depth": 4, "text.depth": 1, "vision.pre_norm": True}),
        ("test_tiny_clip", {"vision.depth": 12, "text.depth": 3}),
        ("test_tiny_clip_shared", {}),
        ("test_tiny_coca", {}),
    ],
)
def test_the_multipliers_equal_a_naive_computation(name, over):
    model = mmssl.create_model(name, **over)
    ours = layer_scales(model, 0.75)
    want = _naive(model, 0.75)
    assert ours.keys() == want.keys()
    for n in want:
        assert ours[n] == pytest.approx(want[n], rel=1e-12), n


def test_a_token_table_tied_to_the_lm_head_trains_as_the_head():
    """GPT's LM head is its token table: at the embeddings' d^(L+1) the output layer would
    hardly train (0.0037 at gpt_124m's depth and d = 0.65); untied, the table is an
    embedding and the separate head trains at lr."""
    tied = mmssl.create_model("test_tiny_gpt")
    assert tied.cfg.text.tie_embeddings and tied.text.lm_head is None
    assert layer_scales(tied, 0.5)["text.token_embed.weight"] == 1.0
    untied = mmssl.create_model("test_tiny_gpt", **{"text.tie_embeddings": False})
    s = layer_scales(untied, 0.5)
    depth = untied.cfg.text.depth
    assert s["text.token_embed.weight"] == 0.5 ** (depth + 1) and s["text.lm_head.weight"] == 1.0
