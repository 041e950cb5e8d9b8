"""Data: shard writing (`shards`), the resumable streaming pipeline (`pipeline`),
augmentations with v1 descriptors (`augment`), text tokenisation and LM packing (`text`),
the built-in demo datasets (`demo`).  Nothing is imported here: `import mmssl.data` is free.
"""

from mmssl import _submodule_attributes

__getattr__ = _submodule_attributes(__name__, __path__)  # `mmssl.data.MODULE` imports it
