"""Random-weight checkpoints of named shapes, written once to a cache folder and reused."""

from __future__ import annotations

import json
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


def tokenizer_within_vocab(model_dir: Path, work: Path) -> Path:
    """A view of model_dir whose tokenizer has no ids past the embedding table (the converters of
    llama.cpp and CTranslate2 refuse those): benchmark shapes keep StarCoder's 49,152 rows while
    the shipped tokenizer adds StarChat's 4 tokens after them. Weights and config are links."""
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    if all(token["id"] < vocab_size for token in tokenizer.get("added_tokens", [])):
        return model_dir
    view = work / f"{model_dir.name}-within-vocab"
    view.mkdir(parents=True, exist_ok=True)
    rewritten = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    for item in model_dir.iterdir():
        if item.name not in rewritten and not (view / item.name).exists():
            (view / item.name).symlink_to(item.resolve())
    dropped = {token["content"] for token in tokenizer["added_tokens"] if token["id"] >= vocab_size}
    tokenizer["added_tokens"] = [token for token in tokenizer["added_tokens"] if token["id"] < vocab_size]
    (view / "tokenizer.json").write_text(json.dumps(tokenizer))
    for name in rewritten[1:]:
        if (model_dir / name).is_file():
            settings = json.loads((model_dir / name).read_text())
            settings.pop("additional_special_tokens", None)
            settings["added_tokens_decoder"] = {key: value for key, value in settings.get("added_tokens_decoder", {}).items()
                                                if value.get("content") not in dropped}
            if name == "special_tokens_map.json":
                settings.pop("added_tokens_decoder")
            (view / name).write_text(json.dumps(settings))
    return view
