"""train.freeze: a prefix stops at a name boundary ("visual.norm" is not
"visual.norm_pre"), the nothing-would-train check looks at tensors (a shared trunk frozen
under one tower's names only), and the log counts a shared tensor once."""

from __future__ import annotations

import logging

import pytest

import mmssl
from mmssl.schema import ConfigError
from mmssl.train.freeze import apply_freeze, frozen_names


def _naive_frozen(model, prefixes):
    """The documented rule, written out: the name is the prefix or starts with prefix + '.'"""
    out = set()
    for name, _ in model.named_parameters(remove_duplicate=False):
        for p in prefixes:
            if name == p or name[: len(p) + 1] == p + ".":
                out.add(name)
    return out


def test_a_prefix_ends_at_a_dot():
    """`visual.norm` (the final norm) leaves `visual.norm_pre` (ln_pre) training, and block 1
    leaves blocks 10 and 11 training."""
    model = mmssl.create_model("test_tiny_clip", **{"vision.pre_norm": True, "vision.depth": 12})
    names = dict(model.named_parameters())
    assert "visual.norm_pre.weight" in names and "visual.trunk.blocks.10.norm1.weight" in names
    for prefixes in (["visual.norm"], ["visual.trunk.blocks.1"], ["text.pos_embed", "visual.norm"]):
        model = mmssl.create_model(
            "test_tiny_clip", **{"vision.pre_norm": True, "vision.depth": 12}
        )
        assert set(frozen_names(model, prefixes)) == _naive_frozen(model, prefixes), prefixes
        apply_freeze(model, prefixes)
        off = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert off == _naive_frozen(model, prefixes), prefixes
    assert "visual.norm_pre.weight" not in _naive_frozen(model, ["visual.norm"])


def test_freezing_every_tensor_of_a_shared_trunk_model_is_refused():
    """The shared trunk is named under visual. and text.: freezing `visual` and every other
    part of the text tower by name, but not `text.trunk`, still freezes every tensor."""
    model = mmssl.create_model("test_tiny_clip_shared")
    tops = sorted({".".join(n.split(".")[:2]) for n, _ in model.named_parameters(
        remove_duplicate=False)})  # fmt: skip
    prefixes = [t for t in tops if not t.startswith(("visual.", "text.trunk"))] + ["visual"]
    assert "text.trunk" not in prefixes and "text.token_embed" in prefixes
    # independently: every tensor (by identity) is under those prefixes
    named = dict(model.named_parameters(remove_duplicate=False))
    under = {id(named[n]) for n in _naive_frozen(model, prefixes)}
    assert under == {id(p) for p in model.parameters()}
    with pytest.raises(ConfigError, match="nothing of it would train"):
        frozen_names(model, prefixes)
    # one tensor left (the text norm) and it is accepted
    frozen_names(model, [p for p in prefixes if p != "text.norm"])


def test_the_log_counts_a_shared_tensor_once(caplog):
    """Both names of the shared trunk frozen: its parameters are counted once (as
    `mmssl plan`'s frozen count, from the deduplicated parameters, does)."""
    import re

    model = mmssl.create_model("test_tiny_clip_shared")
    with caplog.at_level(logging.INFO, logger="mmssl.train"):
        apply_freeze(model, ["visual.trunk", "text.trunk"])
    frozen = [p for p in model.parameters() if not p.requires_grad]  # each tensor once
    count = sum(p.numel() for p in frozen)
    assert count == sum(p.numel() for p in model.visual.trunk.parameters())
    said = re.search(r"train.freeze \[.*\]: (\d+) tensors, (\d+) parameters", caplog.text)
    assert said and int(said.group(2)) == count, caplog.text
    assert int(said.group(1)) == len(frozen)  # tensors, not names
