"""Random-weight GPTBigCode checkpoints written by HF transformers itself: the tests' reference models."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_MODEL_DIR = REPO / "starchat" / "models" / "starchat-nano"


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


def hf_greedy(reference, prompt_ids: list[int], new_tokens: int, repetition_penalty: float = 1.0) -> list[int]:
    """HF transformers' greedy continuation of exactly `new_tokens` tokens (the reference)."""
    input_ids = torch.tensor([prompt_ids])
    # repetition_penalty given always: a checkpoint's generation_config.json may ask for another by
    # default (starchat-nano's asks for 1.1)
    output = reference.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                                repetition_penalty=repetition_penalty)
    return output[0, len(prompt_ids):].tolist()
