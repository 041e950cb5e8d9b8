"""Evaluation: feature extraction, zero-shot, retrieval, few-shot and linear probes,
fine-tuning, LM scoring; `mmssl eval TASK ...` (see `mmssl.eval.cli`)."""

from typing import TYPE_CHECKING

from mmssl import _submodule_attributes

if not TYPE_CHECKING:  # `mmssl.eval.MODULE` imports it (mmssl/__init__.py)
    __getattr__ = _submodule_attributes(__name__, __path__)
