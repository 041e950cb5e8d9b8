"""The inputs of `mmssl shards`, read into samples for `mmssl.data.shards.ShardWriter`.

- an image folder with one subfolder per class (sorted names -> labels 0..C-1), images
  anywhere below a class folder;
- a CSV or JSONL table of (image path, caption[, label]);
- plain text files, one document per file or per paragraph.

Images are decoded once as a check, then keep their jpg/png bytes; bmp/gif/webp/tif and
the Netpbm formats (ppm/pgm/pbm/pnm) are converted to png.  An image of a folder or table
that the OS cannot read (missing, a directory, no permission) is skipped and counted as
`missing_image` in the `skipped` counter the caller passes, one that does not decode
(corrupt, truncated) as `bad_image`, one of more pixels than `max_pixels` (training's
decoder would skip it) as `image_too_large`, a file of a class folder or a table's path
whose extension is no image's as `not_image`; none is written.  An input where no image can be
read is a DataError.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import stat
import string
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from mmssl.data.decode import DEFAULT_MAX_PIXELS, png_damage
from mmssl.data.errors import DataError, SkipCounter

if TYPE_CHECKING:
    from PIL import Image

_IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}
# torchvision ImageFolder's formats and gif, with PIL's other Netpbm names (.pbm, .pnm)
_CONVERT_EXTS = {".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}


class _BadImage(Exception):
    """Image bytes that PIL cannot decode; the message says why."""


class _NotImage(Exception):
    """A path whose extension is no image format's."""


class _TooLarge(Exception):
    """An image of more pixels than the limit; the message says how many."""


def to_rgb8(im: Image.Image) -> Image.Image:
    """A PIL image as 8-bit RGB.  PIL's convert("RGB") clips 16-bit, 32-bit integer and
    float greyscale at 255, which turns a 16-bit image white, so those are brought to 8
    bits first, as torchvision decodes a 16-bit PNG (its top 8 bits, value >> 8): a 16-bit
    TIFF or PGM gives the pixels the same data saved as PNG gives.  Mode "I" (PIL's mode
    for 16-bit PGM and 32-bit integer TIFF) is read as 16-bit when its values are within
    0..65535; "F" as floats in [0, 1], torchvision's and scikit-image's float convention.
    Other ranges have no standard 8-bit meaning, and a guessed scale would give other
    pixels than the source's own tools: ValueError (counted as `bad_image`).  Used by
    `mmssl.data.decode` too, for formats torchvision does not decode."""
    import numpy as np
    from PIL import Image

    if im.mode == "I" or im.mode.startswith("I;16"):
        a = np.asarray(im)
        if a.min() < 0 or a.max() > 65535:
            raise ValueError(f"mode {im.mode} values {a.min()}..{a.max()} are not 16-bit")
        im = Image.fromarray((a >> 8).astype(np.uint8))
    elif im.mode == "F":
        a = np.asarray(im)
        if not (a.min() >= 0 and a.max() <= 1):  # NaN fails too
            raise ValueError(f"mode F values {a.min()}..{a.max()} are not within [0, 1]")
        im = Image.fromarray(np.round(a * 255).astype(np.uint8))
    return im.convert("RGB")


def _image_bytes(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, bytes]:
    """(shard extension, bytes), bmp/gif/webp/tif/ppm/pgm/pbm/pnm converted to png.  OSError
    only when the file cannot be read, _BadImage when it reads but does not decode (a full
    decode: a truncated jpg passes PIL's verify(); ~0.1 ms at 32 px, ~0.6 ms at 224 px),
    _NotImage when its extension is no image's, _TooLarge above `max_pixels` (not decoded)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in _IMAGE_EXTS and ext not in _CONVERT_EXTS:
        raise _NotImage(
            "not an image file by its extension (expected jpg, png, bmp, gif, webp, tif, ppm, "
            "pgm, pbm, pnm)"
        )
    # a device or FIFO named like an image (a link to /dev/zero read until memory ran out;
    # a FIFO's open waited for ever): only regular files are read
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file (a device, FIFO or socket)")
    with open(path, "rb") as f:
        data = f.read()
    # PIL decodes a PNG whose IDAT fails its CRC or inflates to too few rows; the training
    # decoder must not meet one (`png_damage`)
    damage = png_damage(data)
    if damage:
        raise _BadImage(f"PNG {damage}")
    from PIL import Image, UnidentifiedImageError

    buf = io.BytesIO()
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:  # from the header, before any decode
                raise _TooLarge(f"{im.width}x{im.height} > {max_pixels} pixels")
            if ext in _IMAGE_EXTS:
                im.load()
                return _IMAGE_EXTS[ext], data
            to_rgb8(im).save(buf, "PNG")
    except UnidentifiedImageError:
        raise _BadImage("not an image PIL can decode") from None
    except _TooLarge:
        raise
    except Image.DecompressionBombError as err:  # PIL's own limit, past ~179 M pixels
        raise _TooLarge(str(err)) from None
    except Exception as err:  # PIL raises many types (OSError among them) for damaged data
        raise _BadImage(f"{type(err).__name__}: {err}") from None
    return "png", buf.getvalue()


class _Images:
    """Reads the images of one input; one the OS cannot read is counted in `skipped` as
    `missing_image`, one that does not decode as `bad_image` (the first of either kept for
    the error when none could be read)."""

    def __init__(self, source: str, skipped: SkipCounter, max_pixels: int) -> None:
        self.source, self.skipped, self.max_pixels = source, skipped, max_pixels
        self.bad: dict[str, int] = {}
        self.first = ""

    def read(self, path: str, where: str) -> tuple[str, bytes] | None:
        try:
            return _image_bytes(path, self.max_pixels)
        except OSError as err:  # the file, not its content: gone, a directory, no access
            self.skip("missing_image", f"{where}: {err.strerror or err}")
        except _BadImage as err:
            self.skip("bad_image", f"{where}: {err}")
        except _NotImage as err:  # a table's row; a class folder's are counted before
            self.skip("not_image", f"{where}: {err}")
        except _TooLarge as err:
            self.skip("image_too_large", f"{where}: {err} (--max-pixels)")
        return None

    def skip(self, kind: str, where: str) -> None:
        self.bad[kind] = self.bad.get(kind, 0) + 1
        self.first = self.first or where
        self.skipped.add(kind, self.source, where)

    def check(self, written: int) -> None:
        if self.bad and not written:
            kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.bad.items()))
            raise DataError(
                f"{self.source}: no readable image in any of its {sum(self.bad.values())} "
                f"entries (first: {self.first}); skipped: {kinds}"
            )


def _check_template(template: str) -> None:
    """DataError unless `template` has exactly one replacement field for the class name,
    '{}' or '{0}' (a conversion or format spec allowed), and formats with a name."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:  # a lone '{' or '}'
        raise DataError(f"caption template {template!r}: {err}") from None
    if len(fields) != 1 or fields[0] not in ("", "0"):
        listed = ": " + ", ".join(f"{{{f}}}" for f in fields) if fields else ""
        raise DataError(
            f"caption template {template!r} needs exactly one '{{}}' for the class name "
            f"(found {len(fields)}{listed})"
        )
    try:
        template.format("x")
    except (KeyError, IndexError, ValueError) as err:
        raise DataError(
            f"caption template {template!r} does not format a class name ({err})"
        ) from None


def _is_image_name(name: str) -> bool:
    """Whether a file name has the extension of an image `mmssl shards` writes or converts."""
    ext = os.path.splitext(name)[1].lower()
    return ext in _IMAGE_EXTS or ext in _CONVERT_EXTS


def _class_images(class_dir: str) -> tuple[list[str], list[str]]:
    """The image files anywhere below `class_dir`, and the other files there (hidden ones,
    such as .DS_Store, left out: they are the OS's, not the dataset's), as sorted '/'-joined
    relative paths.  Symlinked subfolders are followed, as torchvision's ImageFolder does,
    except that a folder whose real path this walk already reached (a symlink loop, a second
    link to one folder) is left out, so each folder's images are listed once."""

    def fail(err: OSError) -> None:
        raise err

    found, others = [], []
    seen = {os.path.realpath(class_dir)}
    for top, dirs, names in os.walk(class_dir, onerror=fail, followlinks=True):
        # real folders before links beside them, so a folder keeps its own name
        dirs[:] = _unseen(
            top, sorted(dirs, key=lambda d: (os.path.islink(os.path.join(top, d)), d)), seen
        )
        rel = os.path.relpath(top, class_dir).replace(os.sep, "/")
        for name in names:
            if _is_image_name(name):
                found.append(name if rel == "." else f"{rel}/{name}")
            elif not name.startswith("."):
                others.append(name if rel == "." else f"{rel}/{name}")
    return sorted(found), sorted(others)


def _unseen(top: str, dirs: list[str], seen: set[str]) -> list[str]:
    """The folders of `dirs` (in `top`) whose real path is not in `seen`; adds theirs."""
    kept = []
    for name in dirs:
        real = os.path.realpath(os.path.join(top, name))
        if real not in seen:
            seen.add(real)
            kept.append(name)
    return kept


def samples_from_folder(
    root: str,
    caption_template: str | None = None,
    skipped: SkipCounter | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[dict]:
    """An image folder with one subfolder per class (sorted names -> labels 0..C-1); the
    images of a class are those anywhere below its folder, subfolders included, in sorted
    path order.  `caption_template` (e.g. "a photo of a {}.") needs exactly one '{}'.  An
    image the OS cannot read is counted in `skipped` as `missing_image`, one that does not
    decode as `bad_image`, one above `max_pixels` as `image_too_large`, a file that is no
    image by its extension as `not_image`, an image beside the class folders as `no_class`,
    and left out.  A class folder with no image file
    is a DataError, as in torchvision's ImageFolder (its label would have no sample)."""
    if not os.path.isdir(root):
        what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise DataError(f"image folder {root!r} {what}")
    entries = sorted(os.listdir(root))
    classes = [d for d in entries if os.path.isdir(os.path.join(root, d))]
    loose = [n for n in entries if n not in classes and _is_image_name(n)]
    if not classes:
        held = f" (it holds {len(loose)} images directly, in no class)" if loose else ""
        raise DataError(f"image folder {root!r} has no class subfolders{held}")
    if caption_template:
        _check_template(caption_template)
    listed = [_class_images(os.path.join(root, cls)) for cls in classes]
    empty = [cls for cls, (names, _) in zip(classes, listed) if not names]
    if empty and len(empty) < len(classes):  # torchvision's ImageFolder refuses one too
        # (with none at all, the error after the walk says what the folders held instead)
        raise DataError(
            f"image folder {root!r}: class folder(s) {', '.join(map(repr, empty))} hold no "
            "image file, so their labels would have no sample; remove them or add images"
        )
    index = 0
    images = _Images(root, SkipCounter() if skipped is None else skipped, max_pixels)
    for name in loose:  # torchvision's ImageFolder leaves them out too, but without a word
        images.skip("no_class", f"{name}: an image beside the class folders, in none of them")
    for label, (cls, (names, others)) in enumerate(zip(classes, listed)):
        for name in others:  # counted, so that the summary says they were not written
            images.skip("not_image", f"{cls}/{name}: not an image file by its extension")
        for name in names:
            image = images.read(os.path.join(root, cls, name), f"{cls}/{name}")
            if image is None:
                continue
            sample: dict[str, object] = {"__key__": f"{index:08d}", image[0]: image[1]}
            if caption_template:
                sample["txt"] = caption_template.format(cls.replace("_", " "))
            sample["json"] = {"label": label, "class": cls, "path": f"{cls}/{name}"}
            index += 1
            yield sample
    images.check(index)


def _rows(path: str, kind: str, labels: _LabelColumn) -> Iterator[Any]:
    """The rows of a table; a CSV's header goes to `labels` before its first row."""
    # utf-8-sig: a byte-order mark (spreadsheets' "CSV UTF-8") is dropped, not read as part
    # of the first column's name
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            if kind == "jsonl":
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError as err:
                            raise DataError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            else:
                # strict: an unclosed quote is an error; otherwise it read the rest of the
                # file into one field (one sample with a caption of every later row, exit 0)
                reader = csv.DictReader(f, strict=True)
                if reader.fieldnames is not None:  # None: an empty file
                    labels.header(reader.fieldnames)
                for row in _csv_rows(reader, path):
                    # DictReader's key for the fields beyond the header's.  Even empty ones
                    # are refused: `x.jpg,a cat, dog,` under `image,caption,label` would
                    # read caption "a cat" and label " dog"
                    if None in row:
                        raise DataError(
                            f"{path}:{reader.line_num}: {len(row[None])} more field(s) than "
                            f"the header's {len(reader.fieldnames or ())} (a comma in a "
                            "field that is not quoted, or one after the last field?)"
                        )
                    yield row
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None


def _csv_rows(reader: csv.DictReader, path: str) -> Iterator[dict]:
    """The rows of `reader`, a malformed one (an unclosed quote: "unexpected end of data",
    or a field past csv's size limit) a DataError naming where the reader got to (the inner
    reader's line: DictReader's own moves only once a row parsed)."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(
                f"{path}:{reader.reader.line_num}: not valid CSV ({err}; a quote that is not "
                "closed? a field holding a quote must be quoted, its quote doubled)"
            ) from None
        yield row


class _DefaultLabel(str):
    """The type of DEFAULT_LABEL, told apart from a label column the caller names."""


DEFAULT_LABEL: str = _DefaultLabel("label")
"""`samples_from_table`'s label_col default: the column "label" where the table has one."""


class _LabelColumn:
    """Finds a table's labels.  `name` DEFAULT_LABEL: the column "label" where a row has
    one; None or "": no labels; any other name: a column the table must have, in its CSV
    header or in at least one JSONL record, else a DataError naming it and the columns
    there are (a CSV is checked against its header; an empty file or a JSONL without
    records is not checked: it has no samples to write)."""

    def __init__(self, name: str | None, path: str, kind: str) -> None:
        self.name = name or ""
        self.required = bool(name) and not isinstance(name, _DefaultLabel)
        self.path, self.kind = path, kind
        self.found = False
        self.columns: set[str] = set()

    def header(self, columns: Iterable[Any]) -> None:
        """A CSV's header, which every row has: the column must be in it."""
        self._see(columns)
        self.check()

    def value(self, row: dict) -> Any:
        if self.required and not self.found:
            self._see(row)
        return row.get(self.name) if self.name else None

    def _see(self, columns: Iterable[Any]) -> None:
        self.columns.update(k for k in columns if isinstance(k, str))
        self.found = self.name in self.columns

    def check(self) -> None:
        if self.required and self.columns and not self.found:
            where = "header" if self.kind == "csv" else "records"
            raise DataError(
                f"{self.path}: label column {self.name!r} is not in its {where} "
                f"(columns: {', '.join(sorted(self.columns))})"
            )


def samples_from_table(
    path: str,
    image_col: str = "image",
    caption_col: str | None = "caption",
    label_col: str | None = DEFAULT_LABEL,
    kind: str | None = None,
    skipped: SkipCounter | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[dict]:
    """Rows of a CSV or JSONL file: image path (relative to the file), caption[, label].
    caption_col None or "": no captions (image[, label] tables: classification shards).
    kind: "csv" or "jsonl" (default: from the suffix, .jsonl / .json / .ndjson as JSONL).
    label_col: DEFAULT_LABEL (the default) reads the column "label" where there is one;
    None or "" reads no labels; any other name must be a column of the table (see
    _LabelColumn).  A row whose image the OS cannot read is counted in `skipped` as
    `missing_image`, one whose image does not decode as `bad_image`, one above `max_pixels`
    as `image_too_large`, one whose path has no image's extension as `not_image`, and left
    out; a malformed row is a DataError."""
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
        raise DataError(f"table {path!r} {what}")
    if kind is None:
        kind = "jsonl" if path.lower().endswith((".jsonl", ".json", ".ndjson")) else "csv"
    base = os.path.dirname(os.path.abspath(path))
    written = 0
    images = _Images(path, SkipCounter() if skipped is None else skipped, max_pixels)
    labels = _LabelColumn(label_col, path, kind)
    for n, row in enumerate(_rows(path, kind, labels)):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {n + 1} is a {type(row).__name__}, not an object")
        needed = [c for c in (image_col, caption_col) if c]
        if any(c not in row for c in needed):
            raise DataError(
                f"{path}: row {n + 1} lacks column {' or '.join(map(repr, needed))} "
                f"(has {sorted(row)})"
            )
        meta: dict[str, Any] = {"path": str(row[image_col])}
        label = labels.value(row)
        if label not in (None, ""):
            integral = isinstance(label, int) and not isinstance(label, bool)
            if not integral and not (
                isinstance(label, str) and re.fullmatch(r"-?\d+", label.strip())
            ):
                raise DataError(f"{path}: row {n + 1}: label {label!r} is not an integer")
            meta["label"] = int(label)
        caption = row[caption_col] if caption_col else None
        if caption_col and (not isinstance(caption, str) or not caption.strip()):
            raise DataError(f"{path}: row {n + 1}: no caption (got {caption!r})")
        # after the row's checks: a malformed row is an error even without its image
        image = images.read(
            os.path.join(base, str(row[image_col])), f"row {n + 1}: image {row[image_col]!r}"
        )
        if image is None:
            continue
        written += 1
        sample = {"__key__": f"{n:08d}", image[0]: image[1], "json": meta}
        yield sample if caption is None else {**sample, "txt": caption}
    labels.check()
    images.check(written)


def samples_from_text(paths: Iterable[str], docs: str = "file") -> Iterator[dict]:
    """Plain text files as LM documents: one per file, or one per blank-line paragraph.  A
    leading UTF-8 byte-order mark is dropped."""
    index = 0
    for path in paths:
        if not os.path.isfile(path):
            what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
            raise DataError(f"text file {path!r} {what}")
        with open(path, encoding="utf-8-sig", errors="strict") as f:  # drops a leading BOM
            try:
                text = f.read()
            except UnicodeDecodeError:
                raise DataError(f"{path}: not UTF-8 text") from None
        parts = [text] if docs == "file" else re.split(r"\n\s*\n", text)
        for part in parts:
            if part.strip():
                yield {"__key__": f"{index:08d}", "txt": part.strip(), "json": {"source": path}}
                index += 1
