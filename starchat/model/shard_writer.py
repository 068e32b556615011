"""Tensors streamed into safetensors files in Hugging Face's layout: one `model.safetensors`, or
shards `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`. Only the shard
being filled is held in memory; each written shard goes through to disk and leaves the page cache,
so writing a checkpoint larger than memory does not fill it with dirty pages.

With `align`, every tensor starts at a multiple of `align` bytes from the file's start, so a
reader that maps the file can hand the kernels page-aligned weights in place (the loader's
mapped path). The safetensors format allows no holes between tensors, so the gaps are filled by
small uint8 tensors named PADDING_PREFIX + a number, which readers skip; the header is padded
with spaces, as the format allows."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

PADDING_PREFIX = "__padding__."
# Files of a source folder that are weights (rewritten), not copied into a derived checkpoint.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
SAFETENSORS_DTYPE_NAMES = {  # the format's dtype names (the loader reads them back)
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def _drop_from_page_cache(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def save_aligned(tensors: dict[str, torch.Tensor], path: Path, align: int, metadata: dict[str, str]) -> None:
    """A safetensors file of `tensors` (CPU, contiguous) in their order, each starting at a multiple
    of `align` bytes from the file's start (see the module docstring)."""
    header: dict[str, dict] = {"__metadata__": metadata}
    pieces: list[tuple[int, torch.Tensor]] = []  # (offset from the data's start, tensor)
    offset = 0
    for name, tensor in tensors.items():
        gap = -offset % align
        if gap:
            header[f"{PADDING_PREFIX}{len(header)}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            offset += gap
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        pieces.append((offset, tensor))
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % align)  # the data then starts at a multiple of align
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
        data_start = handle.tell()
        for begin, tensor in pieces:
            handle.seek(data_start + begin)  # the padding tensors' bytes read as zeros
            handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        handle.truncate(data_start + offset)


def write_shards(output_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int,
                 align: int | None = None) -> None:
    """Write `tensors` (name, CPU tensor), in order, into output_dir (which exists); with `align`,
    each tensor at a multiple of that many bytes in its file (save_aligned)."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    weight_map: dict[str, int] = {}
    written: list[str] = []

    def flush():
        name = f"model-{len(written) + 1:05d}.safetensors.tmp"
        if align:
            save_aligned(shard, output_dir / name, align, metadata={"format": "pt"})
        else:
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


def write_derived_checkpoint(source_dir: Path, output_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                             config_changes: dict, max_shard_bytes: int, align: int | None = None) -> Path:
    """A checkpoint folder made from source_dir's (`starchat quantize`, `starchat pack`): `tensors`
    in shards, source_dir's config.json updated with `config_changes`, and every other file of
    source_dir that is not a weight file (tokenizer, chat template, generation config, model card)
    copied. Written into `<output_dir>.partial` first and renamed when whole, so a stopped run
    leaves no folder that looks complete."""
    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        write_shards(partial, tensors, max_shard_bytes, align=align)
        hf_config = json.loads((source_dir / "config.json").read_text(encoding="utf-8")) | config_changes
        (partial / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        for item in source_dir.iterdir():
            if item.is_file() and item.name != "config.json" and not item.name.endswith(WEIGHT_FILE_SUFFIXES):
                shutil.copyfile(item, partial / item.name)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(output_dir)
    return output_dir
