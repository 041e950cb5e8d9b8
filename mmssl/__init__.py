"""mmssl: multimodal self-supervised pretraining on one set of transformer blocks.

The public API is four functions.  Importing `mmssl` does no work: each function imports
what it needs when first called, and a subpackage or module named as an attribute
(`mmssl.eval.finetune.Classifier`, `mmssl.models.io.save_pretrained`) is imported on first
use, as `import mmssl.eval.finetune` would.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, overload

if TYPE_CHECKING:
    from torch import nn

    from mmssl.models.multimodal import MultimodalModel
    from mmssl.models.text import TextTransformer
    from mmssl.models.vision import VisionEncoder
    from mmssl.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["create_model", "get_tokenizer", "list_models", "load_encoder"]


def _submodule_attributes(package: str, path: list[str]) -> Callable[[str], ModuleType]:
    """A package's module `__getattr__`: a public submodule of `package` (found on `path`,
    the package's `__path__`, listed once) imported when first named, anything else an
    AttributeError, as is a submodule that does not import (`hasattr(mmssl.data,
    "fastviews")` is False without numba, the error naming the cause)."""
    names: set[str] = set()

    def __getattr__(name: str) -> ModuleType:
        if not names:
            names.update(m.name for m in pkgutil.iter_modules(path) if not m.name.startswith("_"))
        if name in names:
            try:
                return importlib.import_module(f"{package}.{name}")
            except ImportError as err:
                raise AttributeError(
                    f"module {package!r} has no attribute {name!r} ({package}.{name} does not "
                    f"import: {err})"
                ) from err
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


if not TYPE_CHECKING:  # to mypy, a module __getattr__ makes every name exist
    __getattr__ = _submodule_attributes(__name__, __path__)


def create_model(name_or_path: str, **overrides: Any) -> MultimodalModel:
    """Build a randomly initialised model from a registry name (see `list_models()`) or a
    JSON config path.

    A registered name always means the shipped architecture, whatever the working directory
    holds; a local config is reached by a path that is not a bare registered name
    (`./test_tiny_clip`, an absolute path, or a `.json` file).  Only the config is read: for
    an exported model's trained weights use `load_encoder` (create_model warns when given an
    export).  Overrides are nested dicts (`vision={"depth": 2}`) or dotted keys
    (`**{"vision.depth": 2}`).
    """
    from mmssl.models.registry import create_model as _create

    return _create(name_or_path, **overrides)


def list_models() -> list[str]:
    """Names of the shipped architectures."""
    from mmssl.models.registry import list_models as _list

    return list(_list())


# the tower named gives the type returned (STYLE: a return type never depends on a flag
# that the types do not tell)
@overload
def load_encoder(path: str, tower: Literal["vision"] = "vision") -> VisionEncoder: ...
@overload
def load_encoder(path: str, tower: Literal["text"]) -> TextTransformer: ...
@overload
def load_encoder(path: str, tower: Literal["model"]) -> MultimodalModel: ...
def load_encoder(path: str, tower: str = "vision") -> nn.Module:
    """An exported model directory (model.safetensors + config.json) -> one tower, in eval mode.

    tower: "vision" (`forward_features(images)` -> {"pooled": (B, D), "tokens": (B, N, D)},
    `forward_pooled(images)` -> the pooled (B, D) for less work, `encode(images)` -> (B, E);
    images float (B, C, H, W) prepared as config.json's
    `preprocess` says), "text" (`encode(text, text_mask)` -> (B, E), `logits` -> (B, T, V);
    text int64 (B, T) from the export's tokenizer, `get_tokenizer(path)` (the copy beside the
    weights), `batch_encode`), or "model" for the whole MultimodalModel.  The parameters stay
    trainable (finetuning wraps the tower): extract features under `torch.inference_mode()`.
    """
    from mmssl.models.io import load_encoder as _load

    return _load(path, tower)


def get_tokenizer(name_or_path: str | None = None) -> Tokenizer:
    """The shipped default tokenizer (None or "default"), "clip", or a tokenizer file/directory."""
    from mmssl.tokenizer import get_tokenizer as _get

    return _get(name_or_path)
