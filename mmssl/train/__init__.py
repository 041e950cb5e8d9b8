"""Training: recipes, tasks, the DeepSpeed engine and loop, checkpoints, export and plans.

Nothing here is imported by `import mmssl`; DeepSpeed is imported only when a run starts.
"""

from mmssl import _submodule_attributes

__getattr__ = _submodule_attributes(__name__, __path__)  # `mmssl.train.MODULE` imports it
