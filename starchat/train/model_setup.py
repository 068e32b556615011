"""The model to train: a base folder (or Hub id) -> transformers' GPTBigCodeForCausalLM, tokenizer, LoRA.

Training uses transformers' implementation (autograd, gradient checkpointing, peft); ours is
inference-only. The base is loaded in float32 for full fine-tuning (the optimizer's master
weights); under LoRA it stays frozen, in bfloat16 when `--bf16` is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch

from starchat.config import ModelConfig
from starchat.model.loader import resolve_model_dir
from starchat.model.packed_checkpoint import checkpoint_packing
from starchat.model.quantized_checkpoint import checkpoint_quantization
from starchat.tokenizer import Tokenizer
from starchat.train import lora
from starchat.train.special_tokens import add_starchat_tokens, resize_embeddings


@dataclass
class PreparedModel:
    model: torch.nn.Module  # transformers GPTBigCodeForCausalLM, or a peft model wrapping one
    tokenizer_backend: tokenizers.Tokenizer
    base_dir: Path
    added_tokens: list[str]
    new_token_ids: list[int]
    lora_settings: lora.LoraSettings | None
    base_dtype: str | None = None  # the dtype the base is stored in (config.json), the default save dtype

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.tokenizer_backend)

    @property
    def hf_config(self):
        return self.hf_model.config

    @property
    def hf_model(self) -> torch.nn.Module:
        return self.model.get_base_model() if self.lora_settings else self.model


def load_tokenizer_backend(model_dir: Path) -> tokenizers.Tokenizer:
    return Tokenizer.from_dir(model_dir).backend  # Tokenizer.from_dir gives the clear errors


def prepare_model(base: str, *, add_chat_tokens: bool, lora_settings: lora.LoraSettings | None = None,
                  bf16: bool = False, weights_dir: Path | None = None, attn_implementation: str = "sdpa") -> PreparedModel:
    """Load the base (weights from `weights_dir` when resuming a full fine-tune) ready for training.

    With add_chat_tokens, StarChat's four tokens are added to the tokenizer when missing and the
    embedding grows to the tokenizer's size, new rows at the mean row.
    """
    from transformers import GPTBigCodeForCausalLM

    base_dir = resolve_model_dir(base)
    base_config = ModelConfig.from_file(base_dir / "config.json")  # a GPTBigCode checkpoint, or a clear error
    if checkpoint_quantization(base_dir):
        raise ValueError(f"{base_dir}: holds int8 weights (written by `starchat quantize`), which cannot be fine-tuned; "
                         "train from the float checkpoint it was quantized from")
    if checkpoint_packing(base_dir) is not None:
        raise ValueError(f"{base_dir}: holds weights packed for starchat's CPU kernels (written by `starchat pack`), "
                         "which training cannot read; train from the float checkpoint it was packed from")
    backend = load_tokenizer_backend(base_dir)
    added = add_starchat_tokens(backend) if add_chat_tokens else []
    new_token_ids = [backend.token_to_id(token) for token in added]
    source = Path(weights_dir) if weights_dir is not None else base_dir
    load_dtype = torch.bfloat16 if (lora_settings and bf16) else torch.float32
    model = GPTBigCodeForCausalLM.from_pretrained(source, dtype=load_dtype, attn_implementation=attn_implementation)
    model_vocab = model.get_input_embeddings().weight.shape[0]
    tokenizer_vocab = backend.get_vocab_size(with_added_tokens=True)
    if source == base_dir:
        grown = list(range(model_vocab, tokenizer_vocab))
        resize_embeddings(model, max(model_vocab, tokenizer_vocab), sorted(set(new_token_ids) | set(grown)))
    elif tokenizer_vocab > model_vocab:
        raise ValueError(f"{source}: the checkpoint has {model_vocab} embedding rows but the tokenizer {tokenizer_vocab} tokens")
    model.config.use_cache = False
    if lora_settings is not None:
        model = lora.apply_lora(model, lora_settings, new_token_ids)
    return PreparedModel(model, backend, base_dir, added, new_token_ids, lora_settings, base_config.torch_dtype)


def export_state_dict(prepared: PreparedModel, trained_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full HF-named weights (LoRA merged). `trained_model` is the trainer's module: a LossModel
    around prepared.model, maybe DDP/FSDP-wrapped; under FSDP every rank must call this."""
    from starchat.train.distributed import full_model_state_dict

    if prepared.lora_settings is not None:
        return lora.merged_state_dict(prepared.model)
    prefix = "model."  # LossModel's attribute
    return {name.removeprefix(prefix): tensor for name, tensor in full_model_state_dict(trained_model).items()}
