"""Checkpoints stored with int8 weights (`starchat quantize`), so that loading reads half the bytes
of a 16-bit checkpoint and quantizes nothing.

The folder is Hugging Face's (config.json, sharded safetensors, the tokenizer and other files of
the source folder) with two changes: every Linear weight of the blocks and the lm_head is stored as
int8 (`<name>.weight`, I8, in one of the layouts below) beside its float32 per-output-channel scales
(`<name>.weight_scale`), quantized exactly as `--quantize int8` does while loading (quant.py); and
config.json carries `"quantization_config": {"quant_method": "starchat-int8", ...}`. Embeddings,
layer norms and biases keep the source's dtype. A tied lm_head is stored as its own int8 table
(the embedding stays float for lookups), as a loaded int8 model holds it.
So a model loaded from such a folder is the one `--quantize int8` builds from the source, bit for
bit; the loader recognises the folder by its quantization_config (loader.load_model).

Two layouts of the int8 weights (`quantization_config.weight_layout`):
- "panels" (the default): each weight as the CPU kernels read it, panels of 16 output channels,
  (ceil(N / 16), K, 16), the last panel zero-padded (native.pack_weight), every tensor at a 4 KiB
  boundary of its file, and a multi-head c_attn's weight, scales and bias already in the loaded
  order ([all q | all k | all v]). A CPU with the native kernels then uses the weights where they
  lie: the files are mapped, not read and repacked, so a restart finds the weights in the page
  cache (StarChat-beta: the page cache and the process share one copy of its 15.5 GB; loader.py).
  GPUs and CPUs without the kernels unpack the panels at load.
- "rows": Hugging Face's (N, K) orientation and per-head c_attn order, for other tools; packed
  while loading, as a float checkpoint is. Folders without the field (written before the
  panels) are "rows".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from starchat.config import ModelConfig
from starchat.model.quant import quantize_per_channel

QUANT_METHOD = "starchat-int8"
WEIGHT_LAYOUTS = ("panels", "rows")
PANELS_ALIGNMENT = 4096  # bytes: each tensor of a panels folder starts on a page of its file
SCALE_SUFFIX = ".weight_scale"
# Linear weights by name suffix (HF GPTBigCode names); these are stored as int8.
QUANTIZED_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight", "lm_head.weight")


class QuantizedCheckpointError(ValueError):
    """A quantization_config starchat cannot load, or a source it cannot quantize."""


def checkpoint_quantization(model_dir: Path) -> str | None:
    """"int8" for a folder written by `starchat quantize`, None for a float checkpoint; raises for
    any other quantization_config (GPTQ, AWQ, bitsandbytes ... are not formats starchat reads)."""
    config_file = Path(model_dir) / "config.json"
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # ModelConfig.from_file reports an unreadable config.json
    quantization = data.get("quantization_config") if isinstance(data, dict) else None
    if quantization is None:
        return None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method != QUANT_METHOD:
        raise QuantizedCheckpointError(
            f"{config_file}: quantization_config.quant_method {method!r} is not a format starchat loads; give a float16, "
            f"bfloat16 or float32 checkpoint (with --quantize int8 for int8 weights), or one written by `starchat quantize`")
    layout = quantization.get("weight_layout", "rows")
    if layout not in WEIGHT_LAYOUTS:
        raise QuantizedCheckpointError(f"{config_file}: quantization_config.weight_layout {layout!r} is not one starchat "
                                       f"knows ({', '.join(WEIGHT_LAYOUTS)}); rewrite the folder with `starchat quantize`")
    return "int8"


def stored_weight_layout(model_dir: Path) -> str:
    """The int8 weights' layout in a folder for which checkpoint_quantization says "int8"."""
    data = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return data["quantization_config"].get("weight_layout", "rows")


def is_quantized_weight(name: str) -> bool:
    return name.endswith(QUANTIZED_WEIGHTS)


def _quantized(tensor: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return quantize_per_channel(tensor)
    except ValueError as error:  # NaN or infinite values
        raise QuantizedCheckpointError(f"{what} {error}") from None


def _quantized_tensors(source_dir: Path, config: ModelConfig, layout: str, progress: bool):
    """(name, tensor) of the quantized checkpoint, streamed from the source's weight files."""
    from tqdm.auto import tqdm

    from starchat.model.loader import (IGNORED_SUFFIXES, find_weight_files, fused_qkv_layout, iterate_checkpoint,
                                       model_parameter_name)
    from starchat.model.native import pack_weight

    def quantized(tensor: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight, scales = _quantized(tensor, what)
        return (pack_weight(weight) if layout == "panels" else weight), scales

    embedding = None
    with tqdm(desc=f"quantizing {source_dir.name}", unit="tensor", disable=not progress, leave=False) as bar:
        for raw_name, tensor, source in iterate_checkpoint(find_weight_files(source_dir)):
            name = model_parameter_name(raw_name)
            if name.endswith(IGNORED_SUFFIXES):
                continue  # older checkpoints' causal-mask buffers: not weights, the loader skips them too
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # written from the embedding below, as the loader ties it
            if not tensor.is_floating_point():
                raise QuantizedCheckpointError(f"{source}: tensor {raw_name} is {tensor.dtype}, not a float weight; "
                                               "is this checkpoint already quantized?")
            if layout == "panels" and name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
                tensor = fused_qkv_layout(tensor, config)  # the loaded order (per-row scales follow their rows)
            if is_quantized_weight(name):
                weight, scales = quantized(tensor, f"{source}: tensor {raw_name}")
                yield name, weight
                yield name.removesuffix(".weight") + SCALE_SUFFIX, scales
            else:
                if name == "transformer.wte.weight":
                    embedding = tensor
                yield name, tensor
            bar.update(1)
    if config.tie_word_embeddings:
        if embedding is None:
            raise QuantizedCheckpointError(f"{source_dir}: no transformer.wte.weight to build the tied lm_head from")
        weight, scales = quantized(embedding, f"{source_dir}: tensor transformer.wte.weight (the tied lm_head)")
        yield "lm_head.weight", weight
        yield "lm_head" + SCALE_SUFFIX, scales


def _panels_from_rows(source_dir: Path, config: ModelConfig, progress: bool):
    """(name, tensor) of a rows folder's int8 model rewritten in panels: the same values, packed,
    c_attn's weight, scales and bias in the loaded order (nothing is quantized again)."""
    from tqdm.auto import tqdm

    from starchat.model.loader import find_weight_files, fused_qkv_layout, iterate_checkpoint, model_parameter_name
    from starchat.model.native import pack_weight

    with tqdm(desc=f"repacking {source_dir.name}", unit="tensor", disable=not progress, leave=False) as bar:
        for raw_name, tensor, _ in iterate_checkpoint(find_weight_files(source_dir)):
            name = model_parameter_name(raw_name)
            if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias", "attn.c_attn" + SCALE_SUFFIX)):
                tensor = fused_qkv_layout(tensor, config)
            yield name, pack_weight(tensor) if is_quantized_weight(name) else tensor
            bar.update(1)


def write_quantized_checkpoint(source_dir: Path, output_dir: Path, max_shard_bytes: int = 2 << 30,
                               progress: bool = True, layout: str = "panels") -> Path:
    """Quantize the float checkpoint in source_dir into output_dir (which must not exist yet), its
    int8 weights in `layout` (see the module docstring); a source written in rows by `starchat
    quantize` is rewritten in panels as it is (the upgrade of folders from before the panels).
    Written into `<output_dir>.partial` first and renamed when whole. Memory: one source tensor, the shard being filled and, for a
    tied lm_head, the embedding table."""
    source_dir, output_dir = Path(source_dir), Path(output_dir)
    if layout not in WEIGHT_LAYOUTS:
        raise QuantizedCheckpointError(f"layout: {layout!r} is not one of {', '.join(WEIGHT_LAYOUTS)}")
    if output_dir.exists():
        raise QuantizedCheckpointError(f"{output_dir}: already exists; give a new folder for the quantized checkpoint")
    relayout = checkpoint_quantization(source_dir) is not None
    if relayout and (stored_weight_layout(source_dir) != "rows" or layout != "panels"):
        raise QuantizedCheckpointError(f"{source_dir}: is already quantized ({QUANT_METHOD}, {stored_weight_layout(source_dir)}); "
                                       "only a folder in rows can be rewritten, in panels; quantize the float checkpoint otherwise")
    from starchat.model.packed_checkpoint import checkpoint_packing

    if checkpoint_packing(source_dir) is not None:
        raise QuantizedCheckpointError(f"{source_dir}: holds packed float weights (written by `starchat pack`); quantize "
                                       "the float checkpoint it came from")
    from starchat.model.shard_writer import write_derived_checkpoint

    config = ModelConfig.from_file(source_dir / "config.json")
    tensors = _panels_from_rows(source_dir, config, progress) if relayout else _quantized_tensors(source_dir, config, layout, progress)
    quantization = {"quant_method": QUANT_METHOD, "bits": 8, "symmetric": True, "scales": "per output channel, float32",
                    "weights": list(QUANTIZED_WEIGHTS), "weight_layout": layout}
    return write_derived_checkpoint(source_dir, output_dir, tensors, {"quantization_config": quantization}, max_shard_bytes,
                                    align=PANELS_ALIGNMENT if layout == "panels" else None)
