"""Checkpoint folders -> a ready model, streaming one tensor at a time.

The model is built on the `meta` device (no memory), then each checkpoint tensor is read
(safetensors with plain reads, or the files mapped for a `starchat quantize` folder in panels on
a CPU; `.bin` files use `torch.load(mmap=True, weights_only=True)`), converted to the
target dtype and device, and assigned. Peak memory is the final weights plus
one tensor, never a float32 copy of the whole model. Loading is strict: every parameter must
come from the checkpoint with the right shape, and no unknown tensor is accepted.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from starchat.config import ModelConfig
from starchat.model.gpt_bigcode import Attention, GPTBigCodeForCausalLM
from starchat.model.cpu_decode import attach_fused_decode
from starchat.model.huge_pages import advise_huge_pages
from starchat.model import native
from starchat.model.attention import PromptAttention
from starchat.model.cpu_linear import (PackedEmbedding, PackedLinear, compute_in_float32, native_amx_tiles, prepare_cpu_linears,
                                      unpack_weight)
from starchat.model.packed_checkpoint import checkpoint_packing, is_packed_weight
from starchat.model.quant import QUANTIZATION_METHODS, Int8Linear, prepare_int8
from starchat.model.quantized_checkpoint import (SCALE_SUFFIX, checkpoint_quantization, is_quantized_weight,
                                                 stored_weight_layout)
from starchat.model.random_checkpoint import random_state_dict
from starchat.model.shard_writer import PADDING_PREFIX, SAFETENSORS_DTYPE_NAMES

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "starchat-nano"
# Loads slower than this that `starchat quantize` would shorten get a log line saying so.
SLOW_LOAD_SECONDS = 20.0

logger = logging.getLogger(__name__)

# Buffers some older GPTBigCode checkpoints carry; they are recomputed, never loaded.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint problem, told in one line that names the file and what to do."""


@dataclass(frozen=True)
class WeightFile:
    path: Path
    kind: str  # "safetensors" | "bin"


def resolve_model_dir(model: str | os.PathLike | None, revision: str | None = None) -> Path:
    """A local folder, the folder Azure ML mounted (AZUREML_MODEL_DIR), a Hub id, or the embedded default."""
    if model is None:
        azure_dir = os.environ.get("AZUREML_MODEL_DIR")
        if azure_dir:
            return _find_config_dir(Path(azure_dir))
        return EMBEDDED_MODEL_DIR
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: is a file; pass the model folder that holds config.json")
        return _find_config_dir(path)
    looks_like_a_path = str(model).startswith((".", "/", "~")) or str(model).count("/") > 1
    if looks_like_a_path:
        raise CheckpointError(f"{model}: no such folder; pass an existing model folder or a Hub id like HuggingFaceH4/starchat-beta")
    return _download_from_hub(str(model), revision)


def _find_config_dir(root: Path) -> Path:
    """Azure ML mounts a registered model one or two folders below AZUREML_MODEL_DIR."""
    if (root / "config.json").is_file():
        return root
    candidates = sorted(p.parent for p in root.glob("*/config.json")) + sorted(p.parent for p in root.glob("*/*/config.json"))
    if not candidates:
        raise CheckpointError(f"{root}: no config.json here or two folders below; point --model at a Hugging Face model folder")
    return candidates[0]


def _download_from_hub(repo_id: str, revision: str | None) -> Path:
    """The huggingface_hub cache first (works offline), then a download when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass  # not cached yet: download below
    except Exception as error:  # an invalid repo id and the like: nothing a download would fix
        raise CheckpointError(f"{repo_id}: {_first_line(error)}; pass a Hub id like HuggingFaceH4/starchat-beta or a local folder") from None
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        if not any(folder.glob("*.safetensors")):  # older repos ship only pytorch_model*.bin
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns + ["*.bin"]))
        return folder
    except Exception as error:  # offline, gated, misspelt: say which and what to do
        raise CheckpointError(
            f"{repo_id}: not a local folder and not downloadable from the Hub ({type(error).__name__}: {_first_line(error)}); "
            "check the name, log in with `hf auth login` for gated models, or pass a local folder"
        ) from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def find_weight_files(model_dir: Path) -> list[WeightFile]:
    """Safetensors first (single or sharded by index), then pytorch_model*.bin (single or sharded)."""
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index_file = model_dir / index_name
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise CheckpointError(f"{index_file}: not a valid shard index ({error}); re-download it") from None
            files = []
            for name in sorted(set(weight_map.values())):
                shard = model_dir / name
                if not shard.is_file():
                    raise CheckpointError(f"{shard}: shard listed in {index_name} is missing; re-download the checkpoint")
                files.append(WeightFile(shard, kind))
            return files
    if (model_dir / "model.safetensors").is_file():
        return [WeightFile(model_dir / "model.safetensors", "safetensors")]
    if (model_dir / "pytorch_model.bin").is_file():
        return [WeightFile(model_dir / "pytorch_model.bin", "bin")]
    raise CheckpointError(
        f"{model_dir}: no weights (model.safetensors, model.safetensors.index.json, pytorch_model.bin or its index); "
        "download the checkpoint's weight files into this folder"
    )


def model_parameter_name(raw_name: str) -> str:
    """A checkpoint tensor's name as the model's parameter (some checkpoints drop "transformer.")."""
    return raw_name if raw_name.startswith(("transformer.", "lm_head.")) else f"transformer.{raw_name}"


def iterate_checkpoint(files: list[WeightFile], mapped: bool = False) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(name, tensor, file) of every tensor in the files; with `mapped`, safetensors tensors are
    views of the files mapped into memory (see _map_safetensors), not copies."""
    for weight_file in files:
        if weight_file.kind == "safetensors":
            yield from (_map_safetensors if mapped else _iterate_safetensors)(weight_file.path)
        else:
            yield from _iterate_bin(weight_file.path)


PAGE_BYTES = 4096
_SAFETENSORS_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPE_NAMES.items()}


def _safetensors_entries(handle, path: Path, size: int) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    """(name, dtype, shape, first byte, end byte) of each tensor in file order, checked against the
    file's size; padding tensors (shard_writer.PADDING_PREFIX) left out. The layout is an 8-byte
    header length, a JSON header of byte offsets from the data's start, then the data."""
    try:
        header_len = int.from_bytes(handle.read(8), "little")
        if not 0 < header_len <= size - 8:
            raise ValueError(f"header length {header_len} does not fit a file of {size} bytes")
        header = json.loads(handle.read(header_len))
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable safetensors file ({error}); it is probably truncated: re-download it") from None
    data_start = 8 + header_len
    entries = []
    for name, info in sorted(((name, info) for name, info in header.items()
                              if name != "__metadata__" and not name.startswith(PADDING_PREFIX)),
                             key=lambda item: item[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        if data_start + end > size:
            raise CheckpointError(f"{path}: tensor {name} ends past the end of the file ({size} bytes); "
                                  "the file is truncated: re-download it")
        entries.append((name, dtype, info["shape"], data_start + begin, data_start + end))
    return entries


def _iterate_safetensors(path: Path):
    """Read tensors one by one with plain reads, not a whole-file mmap.

    A memory map keeps every page it touched resident until the file is closed, so converting a
    bf16 file to float32 through one would hold the file and the converted model at once.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        for name, dtype, shape, begin, _ in _safetensors_entries(handle, path, size):
            tensor = torch.empty(shape, dtype=dtype)
            handle.seek(begin)
            handle.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else bytearray())
            yield name, tensor, path


def _map_safetensors(path: Path):
    """Tensors that are views of the file mapped privately into memory (copy-on-write: nothing
    ever reaches the file), for a model that keeps its weights as stored (a panels folder): its
    pages are the page cache's, read from disk on first touch and shared with it, so a restart
    finds them there and no second copy exists. 2 MiB pages are asked for before the pages are
    read (advise_huge_pages): where the filesystem caches large folios (ext4 on the 2-core Xeon's
    Linux 6.18) the page cache then reads and maps all of them as huge pages; without asking, how
    many it does depends on how the pages were read (27-95% there). A tensor that does not start
    at a multiple of its element size in the file is copied instead."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        entries = _safetensors_entries(handle, path, size)
        mapping = mmap.mmap(handle.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    advise_huge_pages(mapping)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive
    # Touch every page now (one byte each; read from disk where the page cache lacks it), so the
    # load is done when loading returns: a server is not ready before its weights are in memory,
    # and its first request should not be the one that reads them from disk.
    whole[::PAGE_BYTES].sum()
    for name, dtype, shape, begin, end in entries:
        item_size = torch.empty((), dtype=dtype).element_size()
        data = whole[begin:end] if begin % item_size == 0 else whole[begin:end].clone()
        yield name, data.view(dtype).reshape(shape), path


def _iterate_bin(path: Path):
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise CheckpointError(f"{path}: cannot be loaded ({str(error).splitlines()[0]}); it is probably truncated or not a weights file: re-download it") from None
    for name in list(state.keys()):
        yield name, state.pop(name), path


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool = True,
    quantize: str | None = None,
    load_format: str = "auto",
) -> GPTBigCodeForCausalLM:
    started = time.perf_counter()
    config = ModelConfig.from_file(model_dir / "config.json")
    if load_format not in ("auto", "random"):
        raise ValueError(f"load_format: {load_format!r} is not supported; use auto or random")
    # A folder written by `starchat quantize` holds int8 weights and their scales (the lm_head too),
    # in panels (kept as stored on a CPU with the native kernels) or in rows; one written by
    # `starchat pack` holds float weights in panels, a tied embedding only as the packed lm_head.
    stored_quantization = checkpoint_quantization(model_dir) if load_format == "auto" else None
    stored_packing = checkpoint_packing(model_dir) if load_format == "auto" else None  # its dtype
    stored_panels = stored_packing is not None or (stored_quantization is not None and stored_weight_layout(model_dir) == "panels")
    # float panels are used as stored only in their own dtype, and not when int8 is asked for
    keep_panels = (stored_panels and device.type == "cpu" and native.available()
                   and (stored_packing is None or (stored_packing == dtype and quantize is None)))
    mapped = keep_panels and hasattr(mmap, "MAP_PRIVATE")  # POSIX; elsewhere (Windows) read like any folder
    if load_format == "auto":
        tensors = iterate_checkpoint(find_weight_files(model_dir), mapped=mapped)
    else:  # benchmarks of a shape: no weight files needed, drawn on the target device
        tensors = ((name, tensor, model_dir / "config.json") for name, tensor in random_state_dict(config, dtype, device=device))
    if quantize is not None and quantize not in QUANTIZATION_METHODS:
        raise ValueError(f"quantize: {quantize!r} is not supported; use one of {', '.join(QUANTIZATION_METHODS)}")
    quantize = quantize or stored_quantization
    with torch.device("meta"):
        model = GPTBigCodeForCausalLM(config)
    if stored_quantization:  # int8 weights and scales in the files (the lm_head's too), read as they are
        prepare_int8(model, dtype, skip=())
    expected = {name: param for name, param in model.named_parameters()}  # tied lm_head appears once, as wte
    if quantize is not None and not stored_quantization:
        # Quantized as each weight arrives, from the stored values (before any conversion to dtype,
        # as `starchat quantize` does); lm_head last, from the (tied) embedding or its own weight.
        prepare_int8(model, dtype)
    quantized_while_loading = quantize is not None and not stored_quantization
    head_name = "transformer.wte.weight" if config.tie_word_embeddings else "lm_head.weight"
    head_source = None  # quantized_while_loading: the lm_head's stored values
    tied_names = {"lm_head.weight"} if config.tie_word_embeddings and not stored_quantization and not stored_packing else set()
    loaded: set[str] = set()
    kept_panels: dict[str, torch.Tensor] = {}  # keep_panels: Linear name -> its stored panels

    bar = _progress_bar(sum(1 for _ in expected), f"loading {model_dir.name}", progress)
    for raw_name, tensor, source in tensors:
        name = model_parameter_name(raw_name)
        if name.endswith(IGNORED_SUFFIXES) or name in tied_names:
            continue
        # a packed folder's tied embedding is its lm_head's panels: the model's wte (tied) parameter
        packed_tied_head = stored_packing is not None and config.tie_word_embeddings and name == "lm_head.weight"
        if packed_tied_head:
            name = "transformer.wte.weight"
        if stored_quantization and name.endswith(SCALE_SUFFIX):
            name = name.removesuffix(SCALE_SUFFIX) + ".scales"  # Int8Linear's parameter
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {raw_name}; is this a GPTBigCode checkpoint matching its config.json?")
        target = expected[name]
        stored_int8 = stored_quantization is not None and is_quantized_weight(name)
        in_panels = (stored_int8 and stored_panels) or (stored_packing is not None and (packed_tied_head or is_packed_weight(name)))
        expected_shape = native.packed_shape(*target.shape) if in_panels else tuple(target.shape)
        if tuple(tensor.shape) != expected_shape:
            raise CheckpointError(
                f"{source}: tensor {raw_name} has shape {tuple(tensor.shape)}, config.json implies {expected_shape}; "
                "the weights and config.json do not belong together"
            )
        if (tensor.dtype != torch.int8) if stored_int8 else not tensor.is_floating_point():
            wanted = "int8 (a quantized checkpoint's Linear weight)" if stored_int8 else "floating point weights"
            raise CheckpointError(f"{source}: tensor {raw_name} has dtype {tensor.dtype}, expected {wanted}")
        if in_panels and keep_panels:  # the PackedLinear is built once its bias and scales are in
            kept_panels["lm_head" if packed_tied_head else name.removesuffix(".weight")] = tensor
            loaded.add(name)
            bar.update(1)
            continue
        if in_panels:  # a GPU, no native kernels or another dtype: the (N, K) weight
            tensor = unpack_weight(tensor, target.shape[0], tensor.dtype)
        if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias", "attn.c_attn.scales")) and not stored_panels:
            tensor = fused_qkv_layout(tensor, config)  # a panels folder stores c_attn in the loaded order
        tensor = tensor.to(device=device)
        if quantized_while_loading and name == head_name:
            head_source = tensor  # the same tensor as the embedding where no conversion is needed
        keep_stored = stored_int8 or (quantized_while_loading and name.endswith(".weight")
                                      and isinstance(model.get_submodule(name.removesuffix(".weight")), Int8Linear))
        try:
            _assign(model, name, tensor if keep_stored else tensor.to(dtype=dtype))
        except ValueError as error:  # quantizing it: NaN or infinite values
            raise CheckpointError(f"{source}: tensor {raw_name} {error}") from None
        loaded.add(name)
        bar.update(1)
    bar.close()
    missing = sorted(set(expected) - loaded)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"{model_dir}: checkpoint lacks {shown}; the weight files are incomplete: re-download them")
    if config.tie_word_embeddings and not stored_quantization and "lm_head" not in kept_panels:
        model.lm_head.weight = model.transformer.wte.weight
    if quantized_while_loading:
        # The embedding table stays in float for lookups; the lm_head product reads an int8 copy.
        try:
            model.lm_head = Int8Linear.from_float(head_source, None, dtype)
        except ValueError as error:
            raise CheckpointError(f"{model_dir}: tensor {head_name} (quantized for the lm_head) {error}") from None
        del head_source
    for module_name, panels in kept_panels.items():
        parent_name, _, child = module_name.rpartition(".")
        stored = model.get_submodule(module_name)
        layer = PackedLinear(panels, stored.out_features, stored.bias, getattr(stored, "scales", None))
        layer.mapped_from_file = mapped  # _map_safetensors (or a .bin's torch.load mapping)
        setattr(model.get_submodule(parent_name), child, layer)
        if module_name == "lm_head" and stored_packing is not None and config.tie_word_embeddings:
            model.transformer.wte = PackedEmbedding(layer)  # tokens looked up in the lm_head's panels
    if device.type == "cpu":
        prepare_cpu_linears(model)
        if native.available():
            compute_in_float32(model)
            prompt_attention = choose_prompt_attention(model)
            for module in model.modules():
                if isinstance(module, Attention):
                    module.prompt_attention = prompt_attention
        attach_fused_decode(model)
    model.eval()
    seconds = time.perf_counter() - started
    slow = seconds > SLOW_LOAD_SECONDS and device.type == "cpu" and load_format == "auto" and not keep_panels
    command = None
    if slow and (quantized_while_loading or (stored_quantization and not stored_panels)):
        done = "quantized while loading" if quantized_while_loading else "read and packed (int8 in rows)"
        command = "`starchat quantize` writes the int8 model"
    elif slow and stored_packing is None and native.available():  # a float checkpoint the kernels packed
        done, command = "read and packed", "`starchat pack` writes the model"
    if command:
        logger.info("%s: %s in %.0f s; %s once in the CPU kernels' panels, which load mapped in seconds once the "
                    "files are in the page cache", model_dir, done, seconds, command)
    return model


def choose_prompt_attention(model: GPTBigCodeForCausalLM) -> PromptAttention:
    """How a packed CPU model's prompt chunks attend. Where the native library has AMX tiles, on
    them: rounded to bfloat16 for bfloat16 and int8 weights (whose products round their
    activations so on AMX), kept to 16 bits in split halves for float16 ones. The fallback (no
    tiles granted, or a head size they do not take) is SDPA in bfloat16 where oneDNN's bfloat16
    kernels pay off (as the prompt products run there), else float32; float32 weights always
    attend in float32."""
    weight_dtype = model.transformer.h[0].attn.c_attn.packed_weight.dtype
    if weight_dtype == torch.float32:
        return PromptAttention()
    sdpa_dtype = torch.bfloat16 if any(getattr(m, "amx_products", False) for m in model.modules()) else None
    return PromptAttention(dtype=sdpa_dtype, amx_tiles=native_amx_tiles(), split=weight_dtype == torch.float16)


def fused_qkv_layout(tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Multi-head checkpoints store c_attn per head as (q, k, v); reorder to [all q | all k | all v]."""
    if config.multi_query:
        return tensor
    per_head = tensor.reshape(config.n_head, 3, config.head_dim, *tensor.shape[1:])
    return per_head.transpose(0, 1).reshape(tensor.shape)


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_path)
    if isinstance(module, Int8Linear) and attribute == "weight" and tensor.dtype != torch.int8:
        module.load_float_weight(tensor)
        return
    setattr(module, attribute, torch.nn.Parameter(tensor, requires_grad=False))


def _progress_bar(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="tensor", disable=not enabled, leave=False)
