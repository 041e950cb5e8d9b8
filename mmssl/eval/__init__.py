"""Evaluation: feature extraction, zero-shot, retrieval, few-shot and linear probes,
fine-tuning, LM scoring; `mmssl eval TASK ...` (see `mmssl.eval.cli`)."""

from mmssl import _submodule_attributes

__getattr__ = _submodule_attributes(__name__, __path__)  # `mmssl.eval.MODULE` imports it
