"""Shared fixtures: small random GPTBigCode checkpoints written by HF transformers (the reference)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from reference_checkpoints import write_hf_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
EMBEDDED_MODEL_DIR = REPO / "starchat" / "models" / "starchat-nano"

torch.set_num_threads(min(2, torch.get_num_threads()))
# Tests never read or write the user's tuning cache (model/tuning_cache.py); its own tests turn it
# on in a temporary folder. Child processes (interpreter runs, benchmarks) inherit this.
os.environ.setdefault("STARCHAT_TUNING_CACHE", "0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A small multi-query checkpoint (2 layers, n_embd 64) with the real StarCoder + StarChat tokenizer."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny-mqa"), seed=0)


@pytest.fixture(scope="session")
def tiny_mha_model_dir(tmp_path_factory) -> Path:
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny-mha"), seed=1, multi_query=False, activation_function="gelu")
