"""Data: shard writing (`shards`), the resumable streaming pipeline (`pipeline`),
augmentations with v1 descriptors (`augment`), text tokenisation and LM packing (`text`),
the built-in demo datasets (`demo`).  Nothing is imported here: `import mmssl.data` is free.
"""

from typing import TYPE_CHECKING

from mmssl import _submodule_attributes

if not TYPE_CHECKING:  # `mmssl.data.MODULE` imports it (mmssl/__init__.py)
    __getattr__ = _submodule_attributes(__name__, __path__)
