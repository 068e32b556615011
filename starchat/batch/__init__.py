"""Batch inference: files of prompts in, predictions out (`starchat batch`, `run_batch`)."""

from starchat.batch.runner import BatchOptionError, BatchSummary, run_batch

__all__ = ["run_batch", "BatchSummary", "BatchOptionError"]
