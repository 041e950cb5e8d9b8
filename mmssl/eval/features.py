"""Feature extraction: `mmssl features --model M --data SHARDS --out feats.safetensors`.

Writes `features` (N, D) pooled vision features, `embeddings` (N, E) projected image
embeddings (when the model has a projection), `sample_index` (N,), one (N,) tensor per json field
(`label`, `digit`, ...), and in the safetensors metadata the sample keys (JSON), the model
directory, the sha256 of its vision weights and the image preprocessing (size, mean, std)
the features were extracted with (the tasks that read the file check both against --model).
The tasks that read such a file take labels only from the json fields its metadata lists
under `fields` (a file without that record: any tensor but features, embeddings and
sample_index), and only whole-number values, like the same split read from shards.

With several ranks (a launcher sets WORLD_SIZE) each rank extracts the samples with
`index % world_size == rank`; rows are gathered and put back by sample index, so the file
is identical to a single-process run and padding never duplicates a row.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm import tqdm

from mmssl import distributed
from mmssl.cliargs import ArgumentParser, check_numbers, summary
from mmssl.data.errors import DataError
from mmssl.eval.data import Preprocess, iter_image_batches, iter_raw, shard_urls, shards_hint
from mmssl.eval.features_file import features_metadata, is_features_file, save_features
from mmssl.eval.loading import EvalError, model_device, text_width, vision_tower

if TYPE_CHECKING:
    from mmssl.models.multimodal import MultimodalModel


def assemble_by_index(index: Tensor, rows: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Sort rows by sample index and drop repeated indices (sampler padding).

    index (M,) with repeats allowed, rows {name: (M, ...)} -> (unique sorted index (N,),
    {name: (N, ...)}).  A repeated index keeps its first occurrence.
    """
    order = torch.argsort(index, stable=True)
    index = index[order]
    keep = torch.ones_like(index, dtype=torch.bool)
    keep[1:] = index[1:] != index[:-1]
    return index[keep], {k: v[order][keep] for k, v in rows.items()}


# names a json field cannot take: the columns extract_features returns and a features file
# holds, a batch's image, and what load_features adds; read as fields they replaced those
# columns (a RuntimeError or IndexError in the extraction)
RESERVED_FIELDS = (
    "features",
    "embeddings",
    "sample_index",
    "image",
    "__key__",
    "caption",
    "metadata",
    "_pos",  # extract_features's own column of sample positions
)


def check_field_names(fields: tuple[str, ...] | list[str]) -> None:
    """EvalError naming the first of `fields` with a reserved name (RESERVED_FIELDS)."""
    for f in fields:
        if f in RESERVED_FIELDS:
            raise EvalError(
                f"json field {f!r} cannot be read: its name is reserved for the features' own "
                f"columns ({', '.join(RESERVED_FIELDS)}); name another field"
            )


def detect_fields(urls: list[str], left_out: list[str] | None = None) -> list[str]:
    """Numeric json fields of the first sample (`label`, `digit`, ...), sorted, but those with
    a reserved name (RESERVED_FIELDS), which are appended to `left_out` when given.
    DataError if its json is damaged: an empty list would write features without the labels
    that the other samples hold."""
    for _, key, files in iter_raw(urls):
        if "json" not in files:
            return ["label"] if "cls" in files else []
        try:
            meta = json.loads(files["json"].decode("utf-8-sig"))
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise DataError(f"sample {key!r} of {shards_hint(urls)}: bad_json {err}") from None
        numeric = sorted(
            k for k, v in meta.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        )
        if left_out is not None:
            left_out += [k for k in numeric if k in RESERVED_FIELDS]
        return [k for k in numeric if k not in RESERVED_FIELDS]
    return []


@torch.no_grad()
def extract_features(
    model: MultimodalModel,
    urls: list[str],
    preprocess: Preprocess,
    *,
    batch_size: int = 256,
    fields: tuple[str, ...] = (),
    captions: bool = False,
    limit: int | None = None,
) -> dict[str, Any]:
    """Vision features of every sample, in sample order, on every rank.

    Returns {"sample_index": (N,), "features": (N, D), "embeddings": (N, E) if projected,
    <field>: (N,), "__key__": list[str], "caption": list[str] if captions}.  EvalError for a
    field with a reserved name (RESERVED_FIELDS).
    """
    check_field_names(fields)
    was_training = model.training
    model.eval()
    rank, world = distributed.rank(), distributed.world_size()
    cols: dict[str, list[Tensor]] = {"sample_index": [], "features": [], "embeddings": []}
    cols.update({f: [] for f in fields})
    keys: list[str] = []
    texts: list[str] = []
    joined = 0  # batches appended since the last join
    vision_tower(model)  # EvalError without one
    batches = iter_image_batches(
        urls,
        preprocess,
        batch_size,
        fields=fields,
        captions=captions,
        rank=rank,
        world_size=world,
        limit=limit,
    )
    # a bar on rank 0's terminal only (disable=None: none where stderr is a file or a pipe)
    for batch in tqdm(batches, "features", unit=" batches", disable=None if rank == 0 else True):
        cols["sample_index"].append(batch["sample_index"])
        for name, t in embed_batch(model, batch["image"]).items():
            cols[name].append(t.cpu())  # host memory: a split's rows may not fit the device's
        for f in fields:
            cols[f].append(batch[f])
        keys += batch["__key__"]
        texts += batch.get("caption", [])
        joined += 1
        if joined == 16:
            # the last 16 batches as one block: small per-batch tensors kept between the
            # freed activations fragmented glibc's heap, and resident memory grew ~16 KB a
            # sample for ~0.4 KB of features (1.4 GB at 40k images).  Earlier blocks stay as
            # they are (joining everything each time would copy O(N^2) bytes)
            cols = {n: p[:-16] + [torch.cat(p[-16:])] if p else p for n, p in cols.items()}
            joined = 0
    model.train(was_training)
    if not cols["sample_index"] and world == 1:
        raise DataError(f"no samples in {urls[0]}")
    local: dict[str, Tensor] = {}
    for name, parts in cols.items():
        if parts:
            local[name] = torch.cat(parts)
    # a rank with no samples still takes part in every gather, with empty tensors
    local = _fill_empty(local, fields, model)
    _agree_field_dtypes(local, fields)
    gathered = gather_rows(local, model_device(model))
    index = gathered.pop("sample_index")
    all_keys = [k for part in distributed.all_gather_object(keys) for k in part]
    all_texts = [t for part in distributed.all_gather_object(texts) for t in part]
    rows = dict(gathered)
    rows["_pos"] = torch.arange(len(index))
    index, rows = assemble_by_index(index, rows)
    pos = rows.pop("_pos").tolist()
    out: dict[str, Any] = {**rows, "sample_index": index, "__key__": [all_keys[p] for p in pos]}
    if captions:
        out["caption"] = [all_texts[p] for p in pos]
    return out


def embed_batch(model: MultimodalModel, images: Tensor) -> dict[str, Tensor]:
    """images (B, 3, S, S), on any device -> {"features": (B, D) pooled, "embeddings": (B, E)
    projected, when the vision tower has a projection}, float, on the model's device."""
    proj = vision_tower(model).proj
    pooled = model.forward_pooled(images.to(model_device(model)))  # (B, D)
    out = {"features": pooled.float()}
    if proj is not None:
        out["embeddings"] = proj(pooled).float()  # (B, E)
    return out


def gather_rows(local: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Every rank's rows {name: (B_r, ...)} concatenated in rank order, on the CPU.  The
    gathers run on `device` (the model's: NCCL gathers accelerator tensors only)."""
    return {name: distributed.all_gather_no_grad(t.to(device)).cpu() for name, t in local.items()}


def embedding_column(model: MultimodalModel) -> str:
    """The column of `extract_features` that `encode_image` equals, which zero-shot and
    retrieval score against text embeddings: "embeddings" (projected), or "features" for a
    vision tower without projection (embed_dim null: its encode_image is the pooled
    features, and a CLIP objective compares those).  EvalError when the two towers'
    embeddings differ in width: such a model never compared images with texts."""
    visual = vision_tower(model)
    width = visual.proj.out_features if visual.proj is not None else visual.cfg.dim
    if width != text_width(model):
        raise EvalError(
            f"the model's image embeddings are {width} wide and its text embeddings "
            f"{text_width(model)}: they cannot be compared (without a projection, embed_dim "
            "null, the towers' widths must be equal)"
        )
    return "embeddings" if visual.proj is not None else "features"


def _agree_field_dtypes(local: dict[str, Tensor], fields: tuple[str, ...]) -> None:
    """Cast each json field to one dtype on every rank, the one a single process's joined
    batches get (`field_column` makes a batch's column bool, int64 or float64 by its values,
    so ranks may differ): all_gather read another rank's int64 1 as the float64 5e-324.  A
    rank without samples has no say."""
    if distributed.world_size() == 1 or not fields:
        return
    mine = {f: local[f].dtype if len(local[f]) else None for f in fields}
    ranks = distributed.all_gather_object(mine)
    for f in fields:
        dtypes = [r[f] for r in ranks if r[f] is not None]
        if dtypes:
            local[f] = local[f].to(functools.reduce(torch.promote_types, dtypes))


def _fill_empty(
    local: dict[str, Tensor], fields: tuple[str, ...], model: MultimodalModel
) -> dict[str, Tensor]:
    if "sample_index" in local:
        return local
    visual = vision_tower(model)
    dim = visual.cfg.dim
    out = {"sample_index": torch.zeros(0, dtype=torch.int64), "features": torch.zeros(0, dim)}
    if visual.proj is not None:
        out["embeddings"] = torch.zeros(0, visual.proj.out_features)
    for f in fields:
        out[f] = torch.zeros(0, dtype=torch.int64)
    return out


def _init_from_launcher() -> None:
    """Join the process group a launcher (deepspeed, torchrun) describes in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not distributed.is_initialized():
        from mmssl.train.engine import init_distributed

        init_distributed()


def main(argv: list[str] | None = None) -> int:
    """`mmssl features --model M --data SHARDS --out FILE`: exit code 0, or 2 on bad input."""
    parser = ArgumentParser(prog="mmssl features", description=summary(__doc__))
    parser.add_argument("--model", required=True, help="exported model dir or run dir")
    parser.add_argument(
        "--data", required=True, help="shard pattern, e.g. 'test-{000000..000003}.tar'"
    )
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument(
        "--fields",
        default=None,
        help="comma-separated json fields (default: all numeric fields of the first sample)",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples")
    args = parser.parse_args(argv)
    from mmssl.eval.loading import load_model

    try:
        _init_from_launcher()
        problem = check_numbers(
            args,
            {"batch_size": (lambda v: v >= 1, ">= 1"), "limit": (lambda v: v >= 1, ">= 1")},
        )
        if problem:
            raise EvalError(problem)
        out = Path(args.out)
        if out.is_dir():
            raise EvalError(f"--out {args.out} is a directory; name the .safetensors file")
        if out.exists() and not is_features_file(out):
            raise EvalError(
                f"--out {args.out} exists and is not an mmssl features file; not overwriting it"
            )
        loaded = load_model(args.model)
        urls = shard_urls(args.data)
        left_out: list[str] = []
        fields = (
            tuple(f for f in args.fields.split(",") if f)
            if args.fields is not None
            else tuple(detect_fields(urls, left_out))
        )
        check_field_names(fields)  # --fields: refused before any image is read
        if left_out and distributed.rank() == 0:
            print(
                f"json fields {', '.join(map(repr, left_out))} left out: their names are "
                "reserved for the features' own columns"
            )
        feats = extract_features(
            loaded.model,
            urls,
            loaded.preprocess,
            batch_size=args.batch_size,
            fields=fields,
            limit=args.limit,
        )
    except (EvalError, DataError, FileNotFoundError) as err:
        # a field's value (NaN, not a number) or absence, in a field no one asked for
        found = args.fields is None and isinstance(err, DataError) and " field" in str(err)
        hint = " (the json fields were found in the first sample; --fields picks those to read)"
        print(f"mmssl features: error: {err}{hint if found else ''}", file=sys.stderr)
        return 2
    code = 0
    if distributed.rank() == 0:
        from safetensors import SafetensorError

        from mmssl.eval.cli import missing_dirs, remove_empty_dirs, resolved

        made = missing_dirs(Path(args.out).parent)  # save_features makes them
        try:
            save_features(resolved(args.out), feats, features_metadata(loaded, args.data, fields))
            print(
                f"wrote {len(feats['sample_index'])} x {feats['features'].shape[1]} features "
                f"to {args.out}"
            )
            if bad := int((~torch.isfinite(feats["features"]).all(1)).sum()):  # written as is
                print(
                    f"mmssl features: warning: {bad} rows are not finite (NaN or inf): the "
                    "model's features diverged",
                    file=sys.stderr,
                )
        except (OSError, SafetensorError) as err:  # a parent of --out is a file, /proc/x, ...
            remove_empty_dirs(made)  # no directory of a file that was not written is left
            print(f"mmssl features: error: cannot write {args.out}: {err}", file=sys.stderr)
            code = 2
    distributed.barrier()  # every rank, also when rank 0 failed to write: none waits forever
    return code


if __name__ == "__main__":
    from mmssl.cliargs import tolerant_streams

    tolerant_streams()
    sys.exit(main())
