"""Evaluation: feature extraction, zero-shot, retrieval, few-shot and linear probes,
fine-tuning, LM scoring; `mmssl eval TASK ...` (see `mmssl.eval.cli`)."""
