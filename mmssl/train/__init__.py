"""Training: recipes, tasks, the DeepSpeed engine and loop, checkpoints, export and plans.

Nothing here is imported by `import mmssl`; DeepSpeed is imported only when a run starts.
"""

from typing import TYPE_CHECKING

from mmssl import _submodule_attributes

if not TYPE_CHECKING:  # `mmssl.train.MODULE` imports it (mmssl/__init__.py)
    __getattr__ = _submodule_attributes(__name__, __path__)
