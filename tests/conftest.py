"""Shared fixtures: small random GPTBigCode checkpoints written by HF transformers (the reference)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
EMBEDDED_MODEL_DIR = REPO / "starchat" / "models" / "starchat-nano"

torch.set_num_threads(min(2, torch.get_num_threads()))


def write_hf_checkpoint(path: Path, seed: int = 0, safe_serialization: bool = True, **overrides) -> Path:
    """A random-weight GPTBigCodeForCausalLM saved by transformers itself, with our tokenizer files."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    settings = dict(vocab_size=49156, n_positions=512, n_embd=64, n_layer=2, n_head=4, n_inner=None,
                    multi_query=True, activation_function="gelu_pytorch_tanh", bos_token_id=0, eos_token_id=0,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = GPTBigCodeForCausalLM(GPTBigCodeConfig(**settings)).eval()
    with torch.no_grad():  # default init has zero biases and unit LayerNorms: make every parameter matter
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                parameter.add_(torch.randn_like(parameter) * 0.02)
    model.save_pretrained(path, safe_serialization=safe_serialization)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(EMBEDDED_MODEL_DIR / name, Path(path) / name)
    return Path(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A small multi-query checkpoint (2 layers, n_embd 64) with the real StarCoder + StarChat tokenizer."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny-mqa"), seed=0)


@pytest.fixture(scope="session")
def tiny_mha_model_dir(tmp_path_factory) -> Path:
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny-mha"), seed=1, multi_query=False, activation_function="gelu")
