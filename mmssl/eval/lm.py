"""Language-model evaluation of the text tower: perplexity, multiple choice, samples.

- Perplexity on text shards: documents are packed as in training (`doc + eos`, no bos) and cut
  into non-overlapping rows of context_length + 1 tokens, every token after a row's first
  scored (or, with --stride, slid over as Hugging Face's perplexity guide).  A unigram model (add-one smoothed counts of the train split, or of the evaluated
  text itself when no train split is given) is scored on the same target tokens as the
  baseline the LM must beat.
- Multiple choice from JSONL `{"context": str, "choices": [str, ...], "answer": int}`: each
  choice is scored by its log-likelihood after `k` solved examples (drawn from the other
  items) and the context, lm-eval-harness style (`acc` by total log-likelihood, `acc_norm`
  per character of the choice).  The built-in task `demo` asks whether a demo caption
  continues with a digit word or a colour name.
- Samples: continuations of prompts (temperature, top-k, top-p).
"""

from __future__ import annotations

import argparse
import json
import random
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmssl.eval.loading import EvalError, model_device, text_config, text_tower
from mmssl.eval.metrics import perplexity, topk_accuracy, unigram_perplexity

if TYPE_CHECKING:
    from mmssl.models.multimodal import MultimodalModel

LogitsFn = Callable[[Tensor], Tensor]  # ids (B, T) on the CPU -> logits (B, T, V) on any device
SEP = "\n\n"  # between in-context examples
DEFAULT_PROMPTS = ("The ", "a red ")


def model_logits(model: MultimodalModel) -> LogitsFn:
    """`model.lm_logits` of ids (B, T) on any device, moved to the model's: logits (B, T, V)
    there (the scoring moves its targets to them)."""
    dev = model_device(model)

    def logits(ids: Tensor) -> Tensor:
        return model.lm_logits(ids.to(dev))

    return logits


def token_stream(tokenizer: Any, docs: Iterable[str]) -> list[int]:
    """Documents packed as in training: ids(doc_1) + [eos] + ids(doc_2) + [eos] + ..."""
    out: list[int] = []
    for doc in docs:
        out += tokenizer.encode(doc, add_bos=False, add_eos=False) + [int(tokenizer.eos_id)]
    return out


@torch.no_grad()
def stream_nll(
    logits_fn: LogitsFn,
    tokens: Sequence[int],
    context_length: int,
    batch_size: int = 32,
    stride: int | None = None,
) -> tuple[float, int, Tensor]:
    """(total NLL in nats, number of scored tokens, the scored target ids) of a token stream
    cut into non-overlapping rows of context_length + 1 tokens (the last may be shorter), or
    with `stride` s the sliding window of Hugging Face's perplexity guide: windows of
    context_length tokens every s tokens, each scoring the tokens the one before did not, so
    that past the first window each has >= context_length - s tokens of context.  A window's
    first token is scored by none of its positions: at s = context_length one token a window
    goes unscored (as with the guide's code), as the first of each non-overlapping row does."""
    ids = torch.tensor(tokens, dtype=torch.int64)
    rows: list[tuple[Tensor, int]] = []  # (tokens, the first one scored)
    if stride is None:
        row = context_length + 1
        rows = [(ids[i : i + row], 1) for i in range(0, len(ids), row)]
    else:
        prev_end = 0
        for begin in range(0, len(ids), stride):
            end = min(begin + context_length, len(ids))
            rows.append((ids[begin:end], max(prev_end, begin + 1) - begin))  # first target
            prev_end = end
            if end == len(ids):
                break
    rows = [(r, first) for r, first in rows if len(r) > first]
    if not rows:
        raise EvalError("the text is too short to score (needs at least 2 tokens)")
    total, count, targets = 0.0, 0, []
    by_length: dict[int, list[tuple[Tensor, int]]] = {}
    for item in rows:
        by_length.setdefault(len(item[0]), []).append(item)
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            part = group[i : i + batch_size]
            batch = torch.stack([r for r, _ in part])  # (B, L)
            logits = logits_fn(batch[:, :-1])  # (B, L - 1, V): position j predicts j + 1
            # one row's fp32 log-softmax at a time: the batch's is as large as its logits
            # (6.6 GB at GPT-2's vocabulary, 32 rows of 1024)
            for b, (scored, first) in enumerate(part):
                row_logits = logits[b, first - 1 :].float()
                row_targets = scored[first:].to(row_logits.device)
                total += float(F.cross_entropy(row_logits, row_targets, reduction="sum"))
                count += len(row_targets)
                targets.append(scored[first:])
    return total, count, torch.cat(targets)


# ----------------------------------------------------------------------------- multiple choice


def load_task(path: str) -> list[dict[str, Any]]:
    """Validated items of a JSONL multiple-choice file; EvalError naming the line otherwise."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"task file not found: {path} (or use the built-in task 'demo')")
    try:
        text = p.read_text(encoding="utf-8")  # JSONL is UTF-8 by definition
    except UnicodeDecodeError as err:
        raise EvalError(f"{path}: not UTF-8 text ({err})") from None
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalError(f"{path}:{n}: not valid JSON ({err})") from None
        items.append(check_item(item, f"{path}:{n}"))
    if not items:
        raise EvalError(f"{path}: no items")
    return items


def check_item(item: Any, where: str) -> dict[str, Any]:
    """A multiple-choice item {context, choices, answer}, checked; EvalError naming `where`."""
    if not isinstance(item, dict):
        raise EvalError(f"{where}: expected an object with context, choices, answer")
    missing = [k for k in ("context", "choices", "answer") if k not in item]
    if missing:
        raise EvalError(f"{where}: missing {', '.join(missing)}")
    ctx, choices, answer = item["context"], item["choices"], item["answer"]
    if not isinstance(ctx, str):
        raise EvalError(f"{where}: context must be a string")
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise EvalError(f"{where}: choices must be a list of at least 2 non-empty strings")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise EvalError(f"{where}: answer must be an integer index into choices")
    if not 0 <= answer < len(choices):
        raise EvalError(
            f"{where}: answer index {answer} is out of range for {len(choices)} choices"
        )
    return {"context": ctx, "choices": list(choices), "answer": answer}


def demo_task(n: int = 120, seed: int = 0) -> list[dict[str, Any]]:
    """Built-in 2-way task from the demo captions: does the caption go on with a digit word or a
    colour name?  E.g. "the digit seven in" -> ["red.", "seven."], answer 0."""
    from mmssl.data.captions import COLORS, DIGITS

    digit_slot = [
        "a photo of the digit",
        "a picture of a",
        "a handwritten",
        "a photo of a {color} number",
    ]
    color_slot = ["something", "a picture that is", "the digit {digit} in", "a {digit} drawn in"]
    rng = random.Random(seed)
    colors = list(COLORS)
    items = []
    for i in range(n):
        d, c = rng.choice(DIGITS), rng.choice(colors)
        want_digit = i % 2 == 0
        ctx = rng.choice(digit_slot if want_digit else color_slot).format(digit=d, color=c)
        right, wrong = (d, rng.choice(colors)) if want_digit else (rng.choice(colors), d)
        choices = [right + ".", wrong + "."]
        rng.shuffle(choices)
        items.append({"context": ctx, "choices": choices, "answer": choices.index(right + ".")})
    return items


def _window(prefix: list[int], cont: list[int], context_length: int) -> list[int]:
    """prefix + cont, the prefix cut from the left to fit the context window; EvalError when
    no prefix token is left to predict the continuation's first token from."""
    if not prefix or len(cont) > context_length:
        raise EvalError(
            f"a continuation of {len(cont)} tokens after {len(prefix)} context tokens cannot be "
            f"scored: it needs at least one context token before it within the model's "
            f"{context_length}-token window"
        )
    return (prefix + cont)[-(context_length + 1) :]


@torch.no_grad()
def choice_loglik(
    logits_fn: LogitsFn, prefix: list[int], cont: list[int], context_length: int
) -> float:
    """log p(cont | prefix), summed over the continuation's tokens."""
    return batch_loglik(logits_fn, [(prefix, cont)], context_length)[0]


@torch.no_grad()
def batch_loglik(
    logits_fn: LogitsFn,
    pairs: list[tuple[list[int], list[int]]],
    context_length: int,
    batch_size: int = 64,
) -> list[float]:
    """choice_loglik of many (prefix, cont) pairs, right-padded into batches (a causal model
    never sees the padding after a token)."""
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = [
            (_window(p, c, context_length), len(c)) for p, c in pairs[start : start + batch_size]
        ]
        width = max(len(ids) for ids, _ in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.int64)
        for i, (ids, _) in enumerate(chunk):
            x[i, : len(ids)] = torch.tensor(ids)
        logits = logits_fn(x[:, :-1])  # (B, W - 1, V)
        for i, (ids, n) in enumerate(chunk):
            end = len(ids) - 1  # logits at positions end - n .. end - 1 predict the continuation
            targets = x[i, end - n + 1 : end + 1].to(logits.device)
            # the continuation's rows only: a log-softmax of the whole batch was its size again
            logp = logits[i, end - n : end].float().log_softmax(-1)  # (n, V)
            out.append(float(logp.gather(1, targets[:, None]).sum()))
    return out


def score_task(
    logits_fn: LogitsFn,
    tokenizer: Any,
    items: list[dict[str, Any]],
    shots: int,
    context_length: int,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """{acc, acc_norm, num_items, shots, prompts_cut} of a multiple-choice task, the
    choices scored `batch_size` (prefix, choice) pairs per forward.  `prompts_cut`: the
    items whose prompt and longest choice exceed the context window, so that the prompt was
    cut from the left (the first examples, or all of them, unseen): a k-shot score with
    many cut prompts is not what k examples give.

    The prompt is eos (the start-of-document marker of packed training text), then `shots`
    solved examples from the other items separated by a blank line, then the context; each
    choice follows after one space.  An item counts as right when its answer scores strictly
    above every other choice: a tie or a NaN counts as wrong.
    """
    if shots < 0:
        raise EvalError(f"shots must be >= 0, got {shots}")
    if shots > len(items) - 1:
        raise EvalError(f"{shots} in-context examples need more than {len(items)} items")
    rng = random.Random(seed)
    pairs: list[tuple[list[int], list[int]]] = []
    cut = 0
    for i, item in enumerate(items):
        others = rng.sample([j for j in range(len(items)) if j != i], shots)
        demo = "".join(
            f"{items[j]['context']} {items[j]['choices'][items[j]['answer']]}{SEP}" for j in others
        )
        prefix = [int(tokenizer.eos_id)] + tokenizer.encode(
            demo + item["context"], add_bos=False, add_eos=False
        )
        conts = [tokenizer.encode(" " + c, add_bos=False, add_eos=False) for c in item["choices"]]
        cut += len(prefix) + max(map(len, conts)) > context_length + 1  # as _window keeps
        pairs += [(prefix, cont) for cont in conts]
    lls = batch_loglik(logits_fn, pairs, context_length, batch_size)
    right = right_norm = 0.0
    pos = 0
    for item in items:
        ll = lls[pos : pos + len(item["choices"])]
        pos += len(ll)
        norm = [v / len(c) for v, c in zip(ll, item["choices"])]
        # ties and NaN count against the model (as in `metrics`): an argmax would hand a
        # collapsed or diverged model every item whose answer is listed first
        answer = torch.tensor([item["answer"]])
        right += topk_accuracy(torch.tensor([ll]), answer, (1,))[1]
        right_norm += topk_accuracy(torch.tensor([norm]), answer, (1,))[1]
    return {
        "acc": right / len(items),
        "acc_norm": right_norm / len(items),
        "num_items": len(items),
        "shots": shots,
        "prompts_cut": cut,
    }


@torch.no_grad()
def samples(
    model: MultimodalModel,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    top_p: float | None = None,
) -> list[str]:
    """Decoded continuations (prompt included) of each prompt, sampled with `temperature`,
    `top_k` (None or 0: no cut) and `top_p` (None: no nucleus cut).  Only ids the tokenizer has
    are sampled: a model whose vocab_size is padded past it (as nanoGPT pads GPT-2's 50257 to
    50304) has ids no text decodes to."""
    dev = model_device(model)
    g = torch.Generator(device=dev).manual_seed(seed)  # multinomial samples on the model's
    text = text_tower(model)
    limit = min(int(tokenizer.vocab_size), text.cfg.vocab_size)
    out = []
    for p in prompts:
        ids = torch.tensor(
            [[int(tokenizer.eos_id)] + tokenizer.encode(p, add_bos=False, add_eos=False)],
            device=dev,
        )
        gen = text.generate(
            ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k or None,
            top_p=top_p,
            eos_id=int(tokenizer.eos_id),
            generator=g,
            vocab_limit=limit,
        )
        out.append(tokenizer.decode(gen[0, 1:].tolist()))
    return out


# ----------------------------------------------------------------------------- the task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `lm` task's options."""
    parser.add_argument("--data", default=None, help="text shards to score (perplexity)")
    parser.add_argument(
        "--train-data", default=None, help="text shards the unigram baseline is fit on"
    )
    parser.add_argument(
        "--task",
        action="append",
        default=[],
        help="multiple-choice JSONL file or 'demo' (repeatable)",
    )
    parser.add_argument(
        "--stride",
        type=int,
        default=None,
        help="perplexity over a sliding window moved this many tokens (Hugging Face's "
        "perplexity guide); default: non-overlapping rows",
    )
    parser.add_argument("--shots", default="0,5", help="in-context examples, comma-separated")
    parser.add_argument(
        "--prompt", action="append", default=None, help="generation prompt (repeatable)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40, help="0: no top-k cut")
    parser.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling's mass (none by default)"
    )
    parser.add_argument("--seed", type=int, default=0)


def perplexity_report(
    model: MultimodalModel,
    tokenizer: Any,
    data: str,
    train_data: str | None,
    limit: int | None,
    batch_size: int = 32,
    stride: int | None = None,
) -> dict[str, Any]:
    """Perplexity of the text shards `data`, `batch_size` rows per forward (windows moved by
    `stride` tokens, or non-overlapping rows: `stream_nll`), and the unigram baseline's."""
    from mmssl.eval.data import iter_documents, shard_urls

    def docs(pattern: str) -> list[str]:
        out = list(iter_documents(shard_urls(pattern)))
        return out[:limit] if limit is not None else out

    text_cfg = text_config(model)
    cl = text_cfg.context_length
    tokens = token_stream(tokenizer, docs(data))
    total, n, targets = stream_nll(model_logits(model), tokens, cl, batch_size, stride)
    if train_data is not None:
        counts = torch.bincount(
            torch.tensor(token_stream(tokenizer, docs(train_data))), minlength=tokenizer.vocab_size
        )
    else:
        counts = torch.bincount(targets, minlength=tokenizer.vocab_size)
    return {
        "perplexity": perplexity(total, n),
        "unigram_perplexity": unigram_perplexity(counts[: text_cfg.vocab_size], targets),
        "unigram_fit_on": train_data if train_data is not None else "the evaluated text",
        "num_tokens": n,
        "stride": stride,
    }


@torch.no_grad()
def _check_finite_logits(model: MultimodalModel, tokenizer: Any) -> None:
    """EvalError unless the model's logits for a short text are finite: a diverged model
    (NaN weights) scored 0.0 on every choice task, below chance, as a result, and its
    samples failed with a traceback after the scores were computed."""
    ids = torch.tensor([[int(tokenizer.eos_id)] + tokenizer.encode("The")])  # as `samples`
    if not torch.isfinite(model_logits(model)(ids)).all():
        raise EvalError(
            "the model's next-token logits are not finite (NaN or inf) for the text 'The': "
            "its weights diverged, and no perplexity, choice or sample can be scored"
        )


def run(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    """The `lm` task: writes results.json, summary.md under args.out."""
    from mmssl.eval.fewshot import parse_ints
    from mmssl.eval.report import md_table

    shots = parse_ints(args.shots, "--shots")
    tasks = {name: demo_task() if name == "demo" else load_task(name) for name in args.task}
    loaded = ctx.load()
    model = loaded.model
    if model.text is None or not model.cfg.text.lm_head:
        raise EvalError("LM evaluation needs a text tower with an LM head")
    if not model.cfg.text.causal:
        # as training's next_token check: a bidirectional tower's position t attends to token
        # t + 1, the target it is scored on, so its perplexity and choice scores are copies
        raise EvalError(
            "LM evaluation needs a causal text tower, but the model's text.causal is false "
            "(its tokens see the targets they are scored on)"
        )
    tokenizer = loaded.tokenizer(args.tokenizer)
    cl = model.cfg.text.context_length
    if args.stride is not None and args.stride > cl:
        raise EvalError(
            f"--stride {args.stride} is longer than the model's context_length {cl}: "
            "windows would skip tokens"
        )
    _check_finite_logits(model, tokenizer)
    res: dict[str, Any] = {}
    lines = []
    if model.cfg.caption is not None and model.cfg.caption.mode == "cross":
        note = (
            "this model's LM head scores its cross-attention caption decoder's output in "
            "captioning (CoCa); these scores read the text tower's own output, which only a "
            "next_token objective trains"
        )
        warnings.warn(note, RuntimeWarning, stacklevel=2)
        lines.append(f"Note: {note}.")
    if args.data is not None:
        res.update(
            perplexity_report(
                model,
                tokenizer,
                args.data,
                args.train_data,
                args.limit,
                args.batch_size,
                args.stride,
            )
        )
        lines.append(
            f"Perplexity on `{args.data}`: **{res['perplexity']:.2f}** over {res['num_tokens']} tokens "
            + (
                f"(sliding window of {cl}, stride {args.stride}) "
                if args.stride is not None
                else f"(non-overlapping rows of {cl}) "
            )
            + f"(unigram baseline fit on {res['unigram_fit_on']}: {res['unigram_perplexity']:.2f})."
        )
    mc_rows = []
    for name, items in tasks.items():
        items = items[: args.limit] if args.limit is not None else items
        res.setdefault("multiple_choice", {})[name] = {}
        for k in shots:
            r = score_task(model_logits(model), tokenizer, items, k, cl, args.seed, args.batch_size)
            res["multiple_choice"][name][str(k)] = r
            mc_rows.append([name, k, r["acc"], r["acc_norm"], r["num_items"], r["prompts_cut"]])
    if mc_rows:
        headers = ["task", "shots", "acc", "acc_norm", "items", f"prompts cut to {cl} tokens"]
        lines.append(md_table(headers, mc_rows))
    prompts = args.prompt if args.prompt is not None else list(DEFAULT_PROMPTS)
    res["samples"] = samples(
        model,
        tokenizer,
        prompts,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.seed,
        args.top_p,
    )
    lines.append("Samples:\n\n" + "\n".join(f"- `{s!r}`" for s in res["samples"]))
    data = {"text": args.data, "train_text": args.train_data, "tasks": args.task}
    ctx.report("lm", res, data=data, summary="\n\n".join(lines))
    return res
