"""LM evaluation: perplexity (analytic and naive references), multiple choice (a bigram table
with hand-computed log-likelihoods), task-file validation, samples."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmssl.eval import lm
from mmssl.eval.cli import main, run_task
from mmssl.eval.data import iter_documents, shard_urls
from mmssl.eval.loading import EvalError
from mmssl.models.io import load_pretrained, save_pretrained


class CharTokenizer:
    """Characters ' ', a, b, c, x, newline -> ids 3..8; eos 1."""

    chars = " abcx\n"
    eos_id, vocab_size = 1, 9

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return [3 + self.chars.index(ch) for ch in text]


def bigram_logits(table: torch.Tensor):
    return lambda ids: table[ids]  # (B, T) -> (B, T, V): depends on the current token only


def test_multiple_choice_hand_computed():
    tok = CharTokenizer()
    table = torch.zeros(9, 9)
    space, a, b = 3, 4, 5
    table[a, space] = 2.0  # after 'a' a space is likely
    table[space, b] = 1.0  # after a space 'b' beats 'c'
    logp = table.log_softmax(-1)
    ll_b = lm.choice_loglik(bigram_logits(table), [tok.eos_id, a], [space, b], 32)
    assert ll_b == pytest.approx(float(logp[a, space] + logp[space, b]))
    items = [
        {"context": "a", "choices": ["b", "c"], "answer": 0},
        {"context": "xa", "choices": ["c", "b"], "answer": 1},
        {"context": "a", "choices": ["b", "c"], "answer": 1},  # the model prefers b: wrong
        {"context": "ca", "choices": ["x", "b", "c"], "answer": 1},
    ]
    for shots in (0, 2):  # a bigram ignores the in-context examples
        res = lm.score_task(bigram_logits(table), tok, items, shots, 32)
        want = {"acc": 0.75, "acc_norm": 0.75, "num_items": 4, "shots": shots, "prompts_cut": 0}
        assert res == want
    # a 3-token window keeps 4 tokens: eos + "xa" + " c" (5) and eos + "ca" + " x" are cut;
    # with 2 examples every prompt is
    assert lm.score_task(bigram_logits(table), tok, items, 0, 3)["prompts_cut"] == 2
    assert lm.score_task(bigram_logits(table), tok, items, 2, 3)["prompts_cut"] == 4
    with pytest.raises(EvalError, match="in-context examples need more"):
        lm.score_task(bigram_logits(table), tok, items, 4, 32)


def test_multiple_choice_ties_and_nan_count_against_the_model():
    # a collapsed LM (uniform next token) gives equal-length choices equal log-likelihoods, and a
    # diverged one NaN: neither may score the items whose answer happens to be listed first
    tok = CharTokenizer()
    items = [{"context": "a", "choices": ["b", "c"], "answer": 0}] * 3
    items += [{"context": "a", "choices": ["b", "c"], "answer": 1}]
    uniform = bigram_logits(torch.zeros(9, 9))
    diverged = bigram_logits(torch.full((9, 9), math.nan))
    for logits_fn in (uniform, diverged):
        res = lm.score_task(logits_fn, tok, items, 0, 32)
        assert res["acc"] == 0.0 and res["acc_norm"] == 0.0


def test_task_file_validation(tmp_path, capsys, tiny_model_dir):
    bad = tmp_path / "task.jsonl"
    bad.write_text(
        json.dumps({"context": "a", "choices": ["b", "c"], "answer": 0})
        + "\n"
        + json.dumps({"context": "a", "choices": ["b", "c"], "answer": 2})
        + "\n"
    )
    with pytest.raises(
        EvalError, match=r"task.jsonl:2: answer index 2 is out of range for 2 choices"
    ):
        lm.load_task(str(bad))
    assert (
        main(["lm", "--model", tiny_model_dir, "--task", str(bad), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "out of range" in capsys.readouterr().err
    for item, msg in (
        ({"context": "a", "choices": ["b"], "answer": 0}, "at least 2"),
        ({"context": "a", "choices": ["b", "c"]}, "missing answer"),
        ({"context": "a", "choices": ["b", "c"], "answer": True}, "integer"),
    ):
        with pytest.raises(EvalError, match=msg):
            lm.check_item(item, "x")


def test_task_file_not_utf8_is_one_line(tmp_path, capsys, tiny_model_dir):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"context": "caf\xe9", "choices": ["a", "b"], "answer": 0}\n')
    argv = ["lm", "--model", tiny_model_dir, "--task", str(bad), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmssl eval: error: ") and "latin1.jsonl: not UTF-8" in err
    assert len(err.splitlines()) == 1


def test_demo_task_is_valid_and_balanced():
    items = lm.demo_task(40)
    for i, it in enumerate(items):
        lm.check_item(it, str(i))
    assert sum(it["answer"] for it in items) not in (0, len(items))  # answers are shuffled


@pytest.mark.slow
def test_perplexity_of_a_zero_model_is_the_vocab_size(
    tmp_path, tiny_model_dir, text_shards, tokenizer
):
    model = load_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.text.token_embed.weight.zero_()  # tied head: every logit 0 -> uniform
    zero_dir = tmp_path / "zero"
    save_pretrained(model, zero_dir, extra={"tokenizer": tokenizer.metadata})
    res = run_task(
        [
            "lm",
            "--model",
            str(zero_dir),
            "--data",
            text_shards,
            "--prompt",
            "The",
            "--max-new-tokens",
            "3",
            "--shots",
            "0",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert res["perplexity"] == pytest.approx(tokenizer.vocab_size, rel=1e-4)
    # the unigram of the scored text itself beats uniform
    assert res["unigram_perplexity"] < tokenizer.vocab_size
    assert len(res["samples"]) == 1 and res["samples"][0].startswith("The")


@pytest.mark.slow
def test_perplexity_matches_token_by_token(tiny_model_dir, text_shards, tokenizer):
    model = load_pretrained(tiny_model_dir)
    docs = list(iter_documents(shard_urls(text_shards)))
    tokens = lm.token_stream(tokenizer, docs)
    total, n, targets = lm.stream_nll(model.lm_logits, tokens, 32)
    assert n == len(tokens) - math.ceil(len(tokens) / 33) and len(targets) == n
    naive = 0.0
    with torch.no_grad():
        for start in range(0, len(tokens), 33):
            row = tokens[start : start + 33]
            for t in range(1, len(row)):
                logits = model.lm_logits(torch.tensor([row[:t]]))[0, -1]
                naive -= float(logits.log_softmax(-1)[row[t]])
    assert total == pytest.approx(naive, rel=1e-5)


@pytest.mark.slow
def test_lm_task_end_to_end(tmp_path, tiny_model_dir, text_shards):
    res = run_task(
        [
            "lm",
            "--model",
            tiny_model_dir,
            "--data",
            text_shards,
            "--train-data",
            text_shards,
            "--task",
            "demo",
            "--shots",
            "0,1",
            "--limit",
            "6",
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path),
        ]
    )
    assert set(res["multiple_choice"]["demo"]) == {"0", "1"}
    assert res["multiple_choice"]["demo"]["0"]["num_items"] == 6
    assert res["unigram_fit_on"] == text_shards and len(res["samples"]) == len(lm.DEFAULT_PROMPTS)
    assert "Perplexity" in (tmp_path / "summary.md").read_text()


def test_batched_loglik_equals_one_at_a_time(tiny_model_dir):
    model = load_pretrained(tiny_model_dir)
    pairs = [
        ([1, 5, 9], [7]),
        ([1, 4], [3, 3, 8]),
        ([1] + list(range(10, 50)), [6, 2]),
    ]  # the last is cut
    batched = lm.batch_loglik(model.lm_logits, pairs, 32)
    with torch.no_grad():
        for (prefix, cont), got in zip(pairs, batched):
            ids = (prefix + cont)[-33:]
            want = 0.0
            for t in range(len(ids) - len(cont), len(ids)):
                want += float(
                    model.lm_logits(torch.tensor([ids[:t]]))[0, -1].log_softmax(-1)[ids[t]]
                )
            assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    # a continuation with no context token before it inside the window cannot be scored
    for prefix, cont in [([1] * 5, list(range(33))), ([1] * 5, list(range(40))), ([], [7])]:
        with pytest.raises(EvalError, match="cannot be scored"):
            lm.batch_loglik(model.lm_logits, [(prefix, cont)], 32)
    assert lm.batch_loglik(model.lm_logits, [([1] * 5, list(range(32)))], 32)[0] < 0


def test_documents_not_utf8_are_an_error_and_empty_ones_score_nothing(tmp_path):
    from mmssl.data.errors import DataError
    from mmssl.data.shards import ShardWriter

    with ShardWriter(str(tmp_path), "t", max_count=10) as w:
        w.write({"__key__": "a", "txt": "first document"})
        w.write({"__key__": "b", "txt": "   "})  # no tokens: passed over
        w.write({"__key__": "c", "txt": "last document"})
    assert list(iter_documents([str(tmp_path / "t-000000.tar")])) == [
        "first document",
        "last document",
    ]
    with ShardWriter(str(tmp_path), "u", max_count=10) as w:
        w.write({"__key__": "a", "txt": "first document"})
        w.write({"__key__": "b", "txt": b"caf\xe9"})  # latin-1: its tokens would be lost
    shards = [str(tmp_path / "t-000000.tar"), str(tmp_path / "u-000000.tar")]
    with pytest.raises(DataError, match="document 'b' of .*u-000000.tar: not UTF-8"):
        list(iter_documents(shards))  # names the shard that holds it, not the first


def test_a_bidirectional_text_tower_is_refused(tmp_path, capsys, tokenizer):
    # a bidirectional tower's position t sees token t + 1, the target it is scored on: its
    # "perplexity" and choice log-likelihoods would be copies, not predictions (training refuses
    # next_token on it for the same reason)
    import mmssl

    torch.manual_seed(0)
    model = mmssl.create_model(
        "test_tiny_gpt", **{"text.causal": False, "text.vocab_size": tokenizer.vocab_size}
    )
    assert model.cfg.text.lm_head and not model.cfg.text.causal
    export = tmp_path / "bidir"
    save_pretrained(model, export, extra={"tokenizer": tokenizer.metadata})
    out = tmp_path / "o"
    argv = ["lm", "--model", str(export), "--task", "demo", "--shots", "0", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmssl eval: error: ") and len(err.splitlines()) == 1
    assert "causal" in err and "text.causal is false" in err
    assert not out.exists()  # refused before anything is written
    with pytest.raises(EvalError, match="causal"):
        run_task(argv)


def test_batch_size_bounds_every_forward_and_leaves_the_results(tmp_path, monkeypatch, tokenizer):
    from eval_helpers import make_tiny_model_dir, write_text_shards

    from mmssl.models.multimodal import MultimodalModel

    model_dir = make_tiny_model_dir(str(tmp_path / "m"), tokenizer)
    docs = [
        "The quick brown fox jumps over the lazy dog.",
        "A red seven is a digit drawn in red ink.",
        "def f(x):\n    return x + 1\n",
        "Lists are mutable sequences, typically used to store collections.",
    ] * 4  # several full rows of context_length + 1 tokens
    shards = write_text_shards(str(tmp_path / "text"), docs)
    rows: list[int] = []
    real = MultimodalModel.lm_logits

    def recording(self, text, text_mask=None):
        rows.append(text.shape[0])
        return real(self, text, text_mask)

    monkeypatch.setattr(MultimodalModel, "lm_logits", recording)

    def run(batch_size: int):
        rows.clear()
        res = run_task(
            ["lm", "--model", model_dir, "--data", shards, "--task", "demo", "--limit", "8"]
            + ["--shots", "0,2", "--max-new-tokens", "0", "--prompt", "a"]
            + ["--batch-size", str(batch_size), "--out", str(tmp_path / f"o{batch_size}")]
        )
        return res, list(rows)

    wide, wide_rows = run(256)
    assert max(wide_rows) > 3  # the wide run batches more rows than the narrow ones allow
    for batch_size in (1, 3):
        res, seen = run(batch_size)
        assert seen and max(seen) <= batch_size, (batch_size, seen)
        assert sum(seen) == sum(wide_rows)  # the same rows, cut into smaller batches
        assert res["perplexity"] == pytest.approx(wide["perplexity"], rel=1e-5)
        assert res["num_tokens"] == wide["num_tokens"]
        assert res["unigram_perplexity"] == wide["unigram_perplexity"]
        assert res["multiple_choice"] == wide["multiple_choice"]


def test_lm_batch_size_defaults_to_32_rows_and_the_other_tasks_to_256():
    """lm's rows are whole contexts: the shared default of 256 would hold 256 x 1024 x 50257
    fp32 logits (~53 GB) for gpt_124m."""
    from mmssl.eval.cli import build_parser

    parser = build_parser()
    base = ["--model", "m", "--data", "d"]
    assert parser.parse_args(["lm", *base]).batch_size == 32
    assert parser.parse_args(["retrieval", *base]).batch_size == 256
    assert parser.parse_args(["lm", *base, "--batch-size", "8"]).batch_size == 8


class _DecodingCharTokenizer(CharTokenizer):
    def decode(self, ids: list[int]) -> str:
        if any(not 0 <= i < self.vocab_size for i in ids):  # as Tokenizer.decode refuses them
            raise ValueError(f"token id out of range for vocab_size {self.vocab_size}")
        return "".join(self.chars[i - 3] if i >= 3 else "" for i in ids)


def test_samples_of_a_vocab_padded_past_the_tokenizer_draw_only_its_ids():
    """A model whose vocab_size exceeds the tokenizer's (nanoGPT's padded 50304) could sample
    ids the tokenizer has no text for (a decode error, no results.json): only the
    tokenizer's ids are drawn."""
    import mmssl

    tok = _DecodingCharTokenizer()
    torch.manual_seed(0)
    model = mmssl.create_model("test_tiny_gpt", text={"vocab_size": 64}).eval()  # tokenizer: 9
    texts = lm.samples(model, tok, ["ab", "c"], 12, 1.0, None, seed=0)  # 55 of 64 ids beyond
    assert all(set(t) <= set(tok.chars) for t in texts)
    assert texts[0].startswith("ab") and texts[1].startswith("c")


def test_generate_with_a_vocab_limit_equals_a_naive_loop_over_the_first_ids():
    """Greedy with vocab_limit: the argmax over the first `limit` logits of the full forward
    at each step (a naive loop, no kv cache), never an id at or past the limit."""
    import mmssl

    torch.manual_seed(1)
    text = mmssl.create_model("test_tiny_gpt", text={"vocab_size": 64}).eval().text
    prompt = torch.tensor([[1, 5, 7], [2, 3, 4]])
    got = text.generate(prompt, 6, temperature=0.0, vocab_limit=9)
    want = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = text.logits(want)[:, -1, :9].argmax(-1, keepdim=True)
            want = torch.cat([want, nxt], dim=1)
    assert torch.equal(got, want) and int(got[:, 3:].max()) < 9
    for bad in (65, 0, True, 2.0):
        with pytest.raises(ValueError, match="vocab_limit must be an integer in 1..64"):
            text.generate(prompt, 1, vocab_limit=bad)


def test_a_sample_length_beyond_any_use_is_refused_before_scoring(tmp_path, capsys, tiny_model_dir):
    """--max-new-tokens 1e12 scored the text, then failed allocating 8 TB for the sample, a
    traceback that lost the scores; it is refused at the start, in one line."""
    out = tmp_path / "o"
    argv = ["lm", "--model", tiny_model_dir, "--prompt", "a", "--out", str(out)]
    assert main([*argv, "--max-new-tokens", "1000000000000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmssl eval: error: ") and "--max-new-tokens" in err
    assert "in 0..100000" in err and len(err.splitlines()) == 1 and not out.exists()


def test_a_cross_attention_coca_is_scored_with_a_note(tmp_path, tokenizer):
    """A CoCa's LM head reads its caption decoder's output in training (cross mode): the text
    tower's own output, which `eval lm` scores, is trained only by a next_token objective,
    so the report says so (a prefix-mode decoder is the text tower itself: no note)."""
    import mmssl

    argv = ["--task", "demo", "--shots", "0", "--limit", "2", "--max-new-tokens", "1"]
    for mode in ("cross", "prefix"):
        torch.manual_seed(0)
        name = "test_tiny_coca" if mode == "cross" else "test_tiny_coca_prefix"
        model = mmssl.create_model(name, **{"text.vocab_size": tokenizer.vocab_size})
        assert model.cfg.caption.mode == mode
        export = save_pretrained(model, tmp_path / mode, extra={"tokenizer": tokenizer.metadata})
        out = tmp_path / f"{mode}_out"
        with (
            pytest.warns(RuntimeWarning, match="caption decoder")
            if mode == "cross"
            else (_no_warning())
        ):
            run_task(["lm", "--model", str(export), *argv, "--out", str(out)])
        noted = "Note: this model's LM head" in (out / "summary.md").read_text()
        assert noted == (mode == "cross")


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def guard():
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            yield

    return guard()


def test_top_p_and_no_top_k_reach_generate(tmp_path, capsys, tiny_model_dir, monkeypatch):
    """--top-p is nucleus sampling's mass and --top-k 0 turns the top-k cut off (as Hugging
    Face's top_k=0); before, top-k could not be turned off and top-p did not exist.  Values
    out of range are refused in one line before anything is written."""
    from mmssl.models.text import TextTransformer

    seen = []
    real = TextTransformer.generate

    def spy(self, *args, **kwargs):
        seen.append((kwargs["top_k"], kwargs["top_p"]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TextTransformer, "generate", spy)
    argv = ["lm", "--model", tiny_model_dir, "--prompt", "a", "--max-new-tokens", "2"]
    res = run_task([*argv, "--top-k", "0", "--top-p", "0.5", "--out", str(tmp_path / "o")])
    assert seen == [(None, 0.5)] and len(res["samples"]) == 1
    run_task([*argv, "--out", str(tmp_path / "o2")])
    assert seen[-1] == (40, None)  # the defaults: nanoGPT-like top-k 40, no nucleus
    for flag, value, says in [
        ("--top-p", "0", "in (0, 1]"),
        ("--top-p", "1.5", "in (0, 1]"),
        ("--top-k", "-1", ">= 0"),
    ]:
        out = tmp_path / f"bad{value}"
        assert main([*argv, flag, value, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{flag} must be {says}" in err and not out.exists()
