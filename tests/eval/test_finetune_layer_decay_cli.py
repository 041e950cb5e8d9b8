"""`eval finetune --layer-decay`: the flag given on the command line reaches
the fine-tuning engine (the embeddings at lr x d^(L+1) stay put at a tiny d, the head
trains), d = 1 is accepted by both checks and fine-tunes exactly as without the flag."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import load_file

from mmssl.eval.cli import RULES, run_task
from mmssl.models.io import load_pretrained


def _finetuned(tmp_path, name, model_dir, shards, *extra):
    out = tmp_path / name
    argv = ["finetune", "--model", model_dir, "--train", shards, "--test", shards]
    run_task([*argv, "--steps", "3", "--train-batch-size", "4", "--limit", "8", "--lr", "3e-3",
              *extra, "--out", str(out)])  # fmt: skip
    return load_file(str(out / "finetuned.safetensors"))


def test_the_command_lines_layer_decay_reaches_the_engine(tmp_path, tiny_model_dir, train_shards):
    start = load_pretrained(tiny_model_dir).visual.patch_embed.proj.weight.detach()
    key = "visual.patch_embed.proj.weight"
    tiny = _finetuned(tmp_path, "tiny", tiny_model_dir, train_shards, "--layer-decay", "1e-3")
    plain = _finetuned(tmp_path, "plain", tiny_model_dir, train_shards)
    one = _finetuned(tmp_path, "one", tiny_model_dir, train_shards, "--layer-decay", "1")
    assert (plain[key] - start).abs().max() > 1e-4  # the control: it moves
    assert (tiny[key] - start).abs().max() < 1e-8  # lr x 1e-3^(L+1)
    assert tiny["head.weight"].abs().max() > 1e-4
    assert plain.keys() == one.keys()
    for k in plain:  # d = 1: every multiplier 1, the same run
        torch.testing.assert_close(one[k], plain[k], rtol=0, atol=0, msg=k)


def test_a_layer_decay_of_one_is_accepted():
    from mmssl.cliargs import check_numbers
    from mmssl.train.recipe import recipe_from_dict, validate

    assert check_numbers(argparse.Namespace(layer_decay=1.0), RULES) is None
    assert "in (0, 1]" in (check_numbers(argparse.Namespace(layer_decay=1.5), RULES) or "")
    validate(recipe_from_dict({"optim": {"layer_decay": 1.0}}), world_size=1)
    with pytest.raises(Exception, match=r"optim.layer_decay must be in \(0, 1\]"):
        validate(recipe_from_dict({"optim": {"layer_decay": 1.0001}}), world_size=1)
