"""Tensors streamed into safetensors files in Hugging Face's layout: one `model.safetensors`, or
shards `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`. Only the shard
being filled is held in memory; each written shard goes through to disk and leaves the page cache,
so writing a checkpoint larger than memory does not fill it with dirty pages."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch


def _drop_from_page_cache(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def write_shards(output_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    """Write `tensors` (name, CPU tensor), in order, into output_dir (which exists)."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    weight_map: dict[str, int] = {}
    written: list[str] = []

    def flush():
        name = f"model-{len(written) + 1:05d}.safetensors.tmp"
        save_file(shard, str(output_dir / name), metadata={"format": "pt"})
        _drop_from_page_cache(output_dir / name)
        written.append(name)

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
            shard, shard_bytes = {}, 0
        shard[name] = tensor.contiguous()
        weight_map[name] = len(written)
        shard_bytes += size
    flush()
    if len(written) == 1:
        (output_dir / written[0]).rename(output_dir / "model.safetensors")
        return
    final = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    for temporary, name in zip(written, final):
        (output_dir / temporary).rename(output_dir / name)
    index = {"metadata": {}, "weight_map": {name: final[i] for name, i in weight_map.items()}}
    (output_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
