"""Random-weight checkpoints of named shapes, written once to a cache folder and reused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from starchat.config import NAMED_SHAPES, ModelConfig
from starchat.model.loader import EMBEDDED_MODEL_DIR
from starchat.model.random_checkpoint import write_random_checkpoint


def bench_cache_dir() -> Path:
    return Path(os.environ.get("STARCHAT_BENCH_CACHE", "/tmp/starchat-bench"))


def random_checkpoint(shape: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0, max_shard_bytes: int = 2 << 30) -> Path:
    """The cached folder; written first into `<folder>.partial`, renamed when whole (a killed write is redone)."""
    if shape not in NAMED_SHAPES:
        raise ValueError(f"shape: {shape!r} is not one of {', '.join(sorted(NAMED_SHAPES))}")
    folder = bench_cache_dir() / f"{shape}-{str(dtype).removeprefix('torch.')}-seed{seed}"
    if not (folder / "config.json").is_file():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        config = ModelConfig(**NAMED_SHAPES[shape], multi_query=True)
        write_random_checkpoint(partial, config, dtype=dtype, seed=seed, tokenizer_dir=EMBEDDED_MODEL_DIR,
                                max_shard_bytes=max_shard_bytes)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    return folder
