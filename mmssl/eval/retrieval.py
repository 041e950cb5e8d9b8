"""Image-text retrieval: image->text and text->image recall@{1, 5, 10} on image-text shards.

Each image has its `txt` caption, or all captions of a json `captions` list (COCO-style
several captions per image).  By default captions with identical text count as positives of
every image they describe (the demo data repeats "something red." across many images, and a
ranking cannot tell those images apart); `--exact-pairs` keeps only the written pairs.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmssl.eval.loading import EvalError, model_device, text_config
from mmssl.eval.metrics import ahead_of_best

if TYPE_CHECKING:
    from mmssl.models.multimodal import MultimodalModel

KS = (1, 5, 10)


def caption_groups(image_of_text: Tensor, captions: list[str] | None = None) -> Tensor:
    """(T,) int64: the group of each caption, a caption matching every image that has a
    caption of its group.  Without `captions` each caption is its own group (exact pairs);
    with them (T texts), identical texts share one."""
    t = len(image_of_text)
    if captions is None:
        return torch.arange(t)
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(c, len(ids)) for c in captions], dtype=torch.int64)


def positives(image_of_text: Tensor, num_images: int, captions: list[str] | None = None) -> Tensor:
    """(I, T) bool: image i matches caption j (`caption_groups`).

    image_of_text (T,): the image each caption was written for.  With `captions` (T texts),
    caption j also matches every image that has a caption with the same text.
    """
    image_of_text = torch.as_tensor(image_of_text, dtype=torch.int64)
    group = caption_groups(image_of_text, captions)
    has = torch.zeros(num_images, int(group.max()) + 1 if len(group) else 0, dtype=torch.bool)
    has[image_of_text, group] = True  # (I, G)
    return has[:, group]  # (I, T)


def score(
    image_emb: Tensor,
    text_emb: Tensor,
    image_of_text: Tensor,
    group: Tensor | None = None,
    ks: tuple[int, ...] = KS,
    block: int = 1 << 24,
) -> dict[str, float]:
    """image_emb (I, E), text_emb (T, E) normalised, image_of_text (T,), group (T,) the
    caption groups (`caption_groups`; None: exact pairs) -> {i2t_R@k, t2i_R@k, mean}.

    Recall@k as `metrics.recall_at_k` counts it, computed over blocks of queries of at most
    `block` similarities each: no (I, T) matrix is held (at 40k images the whole float64
    matrices and masks took 34 GB)."""
    img, txt = image_emb.float(), text_emb.float()
    image_of_text = torch.as_tensor(image_of_text, dtype=torch.int64)
    group = torch.arange(len(txt)) if group is None else torch.as_tensor(group, dtype=torch.int64)
    n_groups = int(group.max()) + 1 if len(group) else 0
    # (image, group) pairs: image i matches every caption of group g
    pairs = torch.unique(torch.stack([image_of_text, group], dim=1), dim=0)
    above: dict[str, list[Tensor]] = {"i2t": [], "t2i": []}
    rows = max(1, block // max(1, len(txt)))
    for r0 in range(0, len(img), rows):
        r1 = min(len(img), r0 + rows)
        mine = pairs[(pairs[:, 0] >= r0) & (pairs[:, 0] < r1)]
        has = torch.zeros(r1 - r0, n_groups, dtype=torch.bool)
        has[mine[:, 0] - r0, mine[:, 1]] = True
        above["i2t"].append(ahead_of_best(img[r0:r1] @ txt.T, has[:, group]))
    rows = max(1, block // max(1, len(img)))
    lookup = torch.full((n_groups,), -1, dtype=torch.int64)
    for j0 in range(0, len(txt), rows):
        wanted, inverse = torch.unique(group[j0 : j0 + rows], return_inverse=True)
        lookup[wanted] = torch.arange(len(wanted))
        mine = pairs[lookup[pairs[:, 1]] >= 0]
        has = torch.zeros(len(wanted), len(img), dtype=torch.bool)  # (groups here, I)
        has[lookup[mine[:, 1]], mine[:, 0]] = True
        lookup[wanted] = -1
        above["t2i"].append(ahead_of_best(txt[j0 : j0 + rows] @ img.T, has[inverse]))
    out = {}
    for direction, parts in above.items():
        counts = torch.cat(parts)
        out.update({f"{direction}_R@{k}": float((counts < k).double().mean()) for k in ks})
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def _captions_of(urls: list[str], limit: int | None) -> list[list[str]] | None:
    """Per image, the json `captions` list when the shards have one (None when none does);
    EvalError when some samples have one and others not, whichever comes first (a first
    sample without one scored every image on its `txt` alone, silently)."""
    from mmssl.eval.data import iter_raw, shards_hint

    out: list[list[str]] = []
    without: str | None = None  # the first sample without a list
    for index, key, files in iter_raw(urls):
        if limit is not None and index >= limit:
            break
        try:
            meta = json.loads(files["json"].decode("utf-8-sig")) if "json" in files else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise EvalError(f"sample {key!r} of {shards_hint(urls)}: bad_json {err}") from None
        caps = meta.get("captions") if isinstance(meta, dict) else None
        if caps is None:
            if out:
                raise EvalError(f"sample {key!r} has no 'captions' list but earlier samples do")
            without = without or key
            continue
        if without is not None:
            raise EvalError(
                f"sample {key!r} has a 'captions' list but an earlier sample, {without!r}, has none"
            )
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
            raise EvalError(f"sample {key!r}: 'captions' must be a non-empty list of strings")
        out.append(caps)
    return None if without is not None else out


def embed_texts(model: MultimodalModel, ids: Tensor, mask: Tensor | None) -> Tensor:
    """ids (B, T) and mask (B, T) or None of `batch_encode`, on any device -> (B, E)
    L2-normalised float text embeddings, on the model's device."""
    dev = model_device(model)
    mask = None if mask is None else mask.to(dev)
    return model.encode_text(ids.to(dev), mask, normalize=True).float()


@torch.no_grad()
def encode_texts(
    model: MultimodalModel, tokenizer: Any, texts: list[str], batch_size: int
) -> Tensor:
    """(T, E) L2-normalised text embeddings, on the CPU."""
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = tokenizer.batch_encode(
            texts[i : i + batch_size], text_config(model).context_length
        )
        out.append(embed_texts(model, ids, mask).cpu())
    return torch.cat(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `retrieval` task's options."""
    parser.add_argument("--data", required=True, help="image-text shards (pattern)")
    parser.add_argument(
        "--exact-pairs",
        action="store_true",
        help="identical captions of other images are not positives (where captions repeat, "
        "even a perfect model's recall is then below 1: ties count against it)",
    )


def run(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    """The `retrieval` task: writes results.json, summary.md under args.out."""
    from mmssl.eval.data import shard_urls
    from mmssl.eval.features import embedding_column, extract_features
    from mmssl.eval.fewshot import check_finite
    from mmssl.eval.report import md_table

    loaded = ctx.load()
    model = loaded.model
    if model.text is None or model.visual is None:
        raise EvalError("retrieval needs a model with vision and text towers")
    tokenizer = loaded.tokenizer(args.tokenizer)
    urls = shard_urls(args.data)
    multi = _captions_of(urls, args.limit)
    feats = extract_features(
        model,
        urls,
        loaded.preprocess,
        batch_size=args.batch_size,
        captions=multi is None,
        limit=args.limit,
    )
    per_image = multi if multi is not None else [[c] for c in feats["caption"]]
    texts = [c for caps in per_image for c in caps]
    image_of_text = torch.tensor([i for i, caps in enumerate(per_image) for _ in caps])
    check_finite(feats[embedding_column(model)], "image")  # NaN scored R@k 0.0, as a result
    image_emb = F.normalize(feats[embedding_column(model)], dim=-1)
    text_emb = encode_texts(model, tokenizer, texts, args.batch_size)
    check_finite(text_emb, "caption embedding")
    group = caption_groups(image_of_text, None if args.exact_pairs else texts)
    res: dict[str, Any] = score(image_emb, text_emb, image_of_text, group)
    res.update(num_images=len(per_image), num_texts=len(texts))
    rows = [[d, *(res[f"{d}_R@{k}"] for k in KS)] for d in ("i2t", "t2i")]
    summary = (
        f"{len(per_image)} images, {len(texts)} captions"
        + (
            " (exact pairs: an identical caption of another image ranks as a miss, and ties "
            "count against the model, so a perfect model's R@1 is below 1 where captions "
            "repeat, its R@k where a caption repeats k times or more)"
            if args.exact_pairs
            else " (identical captions count as positives)"
        )
        + ".\n\n"
        + md_table(["direction", *(f"R@{k}" for k in KS)], rows)
    )
    ctx.report(
        "retrieval",
        res,
        data={"shards": args.data, "exact_pairs": args.exact_pairs},
        summary=summary,
    )
    return res
