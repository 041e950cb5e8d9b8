"""Sliding-window perplexity (`mmssl eval lm --stride`) against the loop of Hugging Face's
perplexity guide on GPT2LMHeadModel with the same weights: windows of n_positions tokens every
`stride` tokens, labels -100 but for the tokens the previous window did not score, the loss
times the scored tokens summed.  Before, only non-overlapping rows could be scored, a
perplexity that cannot be compared with the strided figures published for GPT-2."""

from __future__ import annotations

import json

import pytest
import torch

from mmssl.eval import lm
from mmssl.eval.cli import main, run_task
from mmssl.eval.loading import EvalError
from mmssl.interop import load_hf_gpt2
from mmssl.models.io import save_pretrained

transformers = pytest.importorskip("transformers")
CTX = 16


def _models():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=CTX)
    torch.manual_seed(0)
    peer = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # logits far from uniform, so that context matters
        for p in peer.parameters():
            p.mul_(8.0)
    return peer, load_hf_gpt2(peer)


def _guide(peer, ids: torch.Tensor, stride: int) -> tuple[float, int]:
    """Hugging Face's perplexity guide, its loop (batch of one), the tokens counted as its
    loss counts them."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + CTX, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = peer(input_ids, labels=target_ids).loss
        # the labels the loss averages: the guide subtracts one per row for the shift, which
        # drops a label that is already -100 in every window after the first (it undercounts)
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())
        if num_loss_tokens:  # a last window of one token scores none (its loss is NaN)
            nll_sum += float(loss) * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


@pytest.mark.parametrize("length", [100, 16, 17, 5])
@pytest.mark.parametrize("stride", [1, 4, 7, 16])
def test_strided_perplexity_is_the_guides(stride, length):
    peer, model = _models()
    ids = torch.randint(0, 64, (1, length), generator=torch.Generator().manual_seed(1))
    total, n, targets = lm.stream_nll(model.lm_logits, ids[0].tolist(), CTX, 3, stride=stride)
    want_total, want_n = _guide(peer, ids, stride)
    assert n == want_n == len(targets)
    if stride < CTX:  # every token but the first, once (a window's first token is no target)
        assert n == length - 1
    assert total == pytest.approx(want_total, rel=1e-5)


def test_the_cli_takes_a_stride_up_to_the_context(tmp_path, capsys, text_shards, tokenizer):
    model = load_hf_gpt2(
        transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                n_embd=32, n_layer=1, n_head=2, vocab_size=tokenizer.vocab_size, n_positions=CTX
            )
        ).eval()
    )
    save_pretrained(model, tmp_path / "m")
    argv = ["lm", "--model", str(tmp_path / "m"), "--data", text_shards, "--max-new-tokens", "1"]
    argv += ["--prompt", "a", "--shots", "0"]
    res = run_task([*argv, "--stride", "8", "--out", str(tmp_path / "o")])
    rows = run_task([*argv, "--out", str(tmp_path / "o2")])
    assert res["stride"] == 8 and rows["stride"] is None and res["num_tokens"] > rows["num_tokens"]
    assert "stride 8" in (tmp_path / "o" / "summary.md").read_text()
    assert json.loads((tmp_path / "o" / "results.json").read_text())["results"]["stride"] == 8
    for value, says in [
        ("17", "longer than the model's context_length 16"),
        ("0", "--stride must be >= 1"),
    ]:
        out = tmp_path / f"bad{value}"
        assert main([*argv, "--stride", value, "--out", str(out)]) == 2
        assert says in capsys.readouterr().err and not out.exists()


V = 11  # stream_nll's edges on a fixed table of logits


def _logits_fn(calls):
    def fn(x):  # (B, L) -> (B, L, V): a fixed function of the input, refusing empty rows
        assert x.shape[1] >= 1, f"empty rows passed to the model: {tuple(x.shape)}"
        calls.append(tuple(x.shape))
        g = torch.Generator().manual_seed(0)
        table = torch.randn(V, V, generator=g)
        return table[x]

    return fn


@pytest.mark.parametrize("stride", [None, 1, 3])
def test_one_token_is_too_short_to_score(stride):
    with pytest.raises(EvalError, match="too short"):
        lm.stream_nll(_logits_fn([]), [5], 4, stride=stride)


def test_a_last_row_of_one_token_is_not_run():
    # rows of 5 tokens: 5 + 5 + 1 -> the last token has no target in its own row
    calls = []
    total, n, targets = lm.stream_nll(_logits_fn(calls), list(range(11)), 4, batch_size=8)
    assert n == 8 == len(targets) and calls == [(2, 4)]


def test_batches_hold_batch_size_rows():
    calls = []
    lm.stream_nll(_logits_fn(calls), [i % V for i in range(40)], 4, batch_size=3, stride=2)
    assert max(b for b, _ in calls) == 3


def test_a_stride_of_the_context_length_is_taken(tmp_path, text_shards, tokenizer):
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=tokenizer.vocab_size, n_positions=16
    )
    save_pretrained(load_hf_gpt2(transformers.GPT2LMHeadModel(cfg).eval()), tmp_path / "m")
    argv = ["lm", "--model", str(tmp_path / "m"), "--data", text_shards, "--max-new-tokens", "1"]
    argv += ["--prompt", "a", "--shots", "0", "--stride", "16", "--out", str(tmp_path / "o")]
    assert run_task(argv)["stride"] == 16
