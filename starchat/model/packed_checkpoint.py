"""Float checkpoints stored as the CPU kernels read them (`starchat pack`), so that a CPU engine
maps the files instead of reading and repacking every weight at each start.

What `starchat quantize --layout panels` does for int8 weights, for 16-bit (or float32) ones: the
folder is Hugging Face's (config.json, sharded safetensors, the tokenizer and the other files of
the source folder) with
- every Linear weight of the blocks and the lm_head in panels of 16 output channels, (ceil(N / 16),
  K, 16), the last panel zero-padded (native.pack_weight), each tensor at a 4 KiB boundary of its
  file, a multi-head c_attn's weight and bias already in the loaded order;
- a tied embedding stored once, as the packed lm_head: the engine looks tokens up in its panels
  (cpu_linear.PackedEmbedding), as it does after packing a tied float checkpoint at load;
- every tensor in one dtype (`--dtype`, default the source's torch_dtype), written to config.json
  as torch_dtype, and `"starchat_packing": {"weight_layout": "panels", "dtype": ...}`.
A CPU with the native kernels that loads it in that dtype keeps the weights where they lie
(mapped copy-on-write, shared with the page cache and with other processes serving the folder;
loader.load_model). GPUs, CPUs without the kernels and other dtypes unpack the panels at load.
Other tools (HF transformers) cannot read the packed tensors: keep the source for them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from starchat.config import ModelConfig
from starchat.model.quantized_checkpoint import PANELS_ALIGNMENT, QUANTIZED_WEIGHTS, checkpoint_quantization

PACKING_KEY = "starchat_packing"
PACKED_WEIGHTS = QUANTIZED_WEIGHTS  # the Linear weights by name suffix: c_attn, both c_proj, c_fc, lm_head
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PackedCheckpointError(ValueError):
    """A packing starchat cannot load, or a source it cannot pack."""


def checkpoint_packing(model_dir: Path) -> torch.dtype | None:
    """The stored dtype of a folder written by `starchat pack`, None for any other folder."""
    config_file = Path(model_dir) / "config.json"
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # ModelConfig.from_file reports an unreadable config.json
    packing = data.get(PACKING_KEY) if isinstance(data, dict) else None
    if packing is None:
        return None
    layout = packing.get("weight_layout") if isinstance(packing, dict) else None
    dtype = packing.get("dtype") if isinstance(packing, dict) else None
    if layout != "panels" or dtype not in _DTYPES:
        raise PackedCheckpointError(f"{config_file}: {PACKING_KEY} {packing!r} is not a packing starchat knows "
                                    "(weight_layout panels, dtype float32, float16 or bfloat16); rewrite the folder with "
                                    "`starchat pack` from its float checkpoint")
    return _DTYPES[dtype]


def is_packed_weight(name: str) -> bool:
    return name.endswith(PACKED_WEIGHTS)


def _packed_tensors(source_dir: Path, config: ModelConfig, dtype: torch.dtype, progress: bool):
    """(name, tensor) of the packed checkpoint, streamed from the source's weight files; a tied
    embedding is held until the end and written once, as the packed lm_head."""
    from tqdm.auto import tqdm

    from starchat.model.loader import (IGNORED_SUFFIXES, find_weight_files, fused_qkv_layout, iterate_checkpoint,
                                       model_parameter_name)
    from starchat.model.native import pack_weight

    embedding = None
    with tqdm(desc=f"packing {source_dir.name}", unit="tensor", disable=not progress, leave=False) as bar:
        for raw_name, tensor, source in iterate_checkpoint(find_weight_files(source_dir)):
            name = model_parameter_name(raw_name)
            if name.endswith(IGNORED_SUFFIXES):
                continue  # older checkpoints' causal-mask buffers: not weights
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # the embedding, written below
            if not tensor.is_floating_point():
                raise PackedCheckpointError(f"{source}: tensor {raw_name} is {tensor.dtype}, not a float weight")
            tensor = tensor.to(dtype)
            if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
                tensor = fused_qkv_layout(tensor, config)  # the loaded order
            if name == "transformer.wte.weight" and config.tie_word_embeddings:
                embedding = tensor
            else:
                yield name, pack_weight(tensor) if is_packed_weight(name) else tensor
            bar.update(1)
    if config.tie_word_embeddings:
        if embedding is None:
            raise PackedCheckpointError(f"{source_dir}: no transformer.wte.weight to build the tied lm_head from")
        yield "lm_head.weight", pack_weight(embedding)


def write_packed_checkpoint(source_dir: Path, output_dir: Path, dtype: torch.dtype | None = None,
                            max_shard_bytes: int = 2 << 30, progress: bool = True) -> Path:
    """Write the float checkpoint in source_dir into output_dir (which must not exist yet) packed
    (module docstring), in `dtype` (default: the source's torch_dtype, else float32). Written into
    `<output_dir>.partial` first and renamed when whole. Memory: one source tensor, the shard being
    filled and, for a tied lm_head, the embedding table."""
    from starchat.model.shard_writer import write_derived_checkpoint

    source_dir, output_dir = Path(source_dir), Path(output_dir)
    if output_dir.exists():
        raise PackedCheckpointError(f"{output_dir}: already exists; give a new folder for the packed checkpoint")
    if checkpoint_quantization(source_dir) is not None or checkpoint_packing(source_dir) is not None:
        raise PackedCheckpointError(f"{source_dir}: was written by starchat (quantized or packed); pack the float "
                                    "checkpoint it came from")
    config = ModelConfig.from_file(source_dir / "config.json")
    dtype = dtype or _DTYPES.get(config.torch_dtype, torch.float32)
    dtype_name = next(name for name, value in _DTYPES.items() if value == dtype)
    packing = {"weight_layout": "panels", "dtype": dtype_name, "weights": list(PACKED_WEIGHTS),
               "tied_embedding": "stored once, as the packed lm_head" if config.tie_word_embeddings else None}
    return write_derived_checkpoint(source_dir, output_dir, _packed_tensors(source_dir, config, dtype, progress),
                                    {"torch_dtype": dtype_name, PACKING_KEY: packing}, max_shard_bytes, align=PANELS_ALIGNMENT)

