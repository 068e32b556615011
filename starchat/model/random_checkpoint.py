"""Random-weight GPTBigCode checkpoints in Hugging Face layout, for benchmarks, tests and the demo default.

Speed does not depend on weight values, so benchmarks of a named shape (starchat-beta, starcoder,
tiny_starcoder) write one of these instead of downloading gigabytes. Weights are drawn from a
seeded generator, so the same call writes the same file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from starchat.config import ModelConfig
from starchat.model.shard_writer import write_shards

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def random_state_dict(config: ModelConfig, dtype: torch.dtype, seed: int = 0, device: torch.device | str = "cpu"):
    """Yield (name, tensor) one at a time, so huge shapes never sit whole in memory twice.

    Drawn on `device` (a GPU draws a 16B model in seconds); values differ between devices.
    """
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape):
        return (torch.randn(*shape, generator=generator, device=device) * 0.02).to(dtype)

    qkv = config.n_embd + 2 * config.kv_dim
    yield "transformer.wte.weight", normal(config.vocab_size, config.n_embd)
    yield "transformer.wpe.weight", normal(config.n_positions, config.n_embd)
    for i in range(config.n_layer):
        prefix = f"transformer.h.{i}"
        yield f"{prefix}.ln_1.weight", (1 + normal(config.n_embd)).to(dtype)
        yield f"{prefix}.ln_1.bias", normal(config.n_embd)
        yield f"{prefix}.attn.c_attn.weight", normal(qkv, config.n_embd)
        yield f"{prefix}.attn.c_attn.bias", normal(qkv)
        yield f"{prefix}.attn.c_proj.weight", normal(config.n_embd, config.n_embd)
        yield f"{prefix}.attn.c_proj.bias", normal(config.n_embd)
        yield f"{prefix}.ln_2.weight", (1 + normal(config.n_embd)).to(dtype)
        yield f"{prefix}.ln_2.bias", normal(config.n_embd)
        yield f"{prefix}.mlp.c_fc.weight", normal(config.n_inner, config.n_embd)
        yield f"{prefix}.mlp.c_fc.bias", normal(config.n_inner)
        yield f"{prefix}.mlp.c_proj.weight", normal(config.n_embd, config.n_inner)
        yield f"{prefix}.mlp.c_proj.bias", normal(config.n_embd)
    yield "transformer.ln_f.weight", (1 + normal(config.n_embd)).to(dtype)
    yield "transformer.ln_f.bias", normal(config.n_embd)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", normal(config.vocab_size, config.n_embd)


def write_random_checkpoint(
    output_dir: Path,
    config: ModelConfig,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    tokenizer_dir: Path | None = None,
    max_shard_bytes: int = 5 << 30,
) -> Path:
    """Write config.json, (sharded) model.safetensors and the tokenizer files into output_dir."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    hf_config = config.to_hf_dict() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (output_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    write_shards(output_dir, random_state_dict(config, dtype, seed), max_shard_bytes)
    if tokenizer_dir is not None:
        for file_name in _TOKENIZER_FILES:
            if (Path(tokenizer_dir) / file_name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / file_name, output_dir / file_name)
    return output_dir
