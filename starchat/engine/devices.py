"""Picking the device, the dtype and the KV-cache budget for this machine."""

from __future__ import annotations

import logging
import os

import torch

from starchat.model import native
from starchat.model.cpu_linear import cpu_has_fast_bf16

logger = logging.getLogger("starchat.engine")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device: {name!r} names GPU {device.index}, but only {torch.cuda.device_count()} "
                         "are visible (cuda:0 onwards)")
    return device


def resolve_dtype(name: str, device: torch.device, quantize: str | None = None,
                  stored_dtype: str | None = None) -> torch.dtype:
    """`name`, or for "auto" what runs fastest here without rounding the checkpoint's weights further.

    On a CPU with starchat's native kernels (docs/ENGINE.md), a checkpoint stored in 16 bits stays
    in its dtype: the kernels read 16-bit weights and compute in float32, so decoding reads half of
    float32's bytes per token (1.8-2.2x float32's batch-1 tokens/s, docs/PERFORMANCE.md), and
    many rows run about as fast as float32's. Without the kernels PyTorch's 16-bit products are
    slow for many rows, so float32 it is unless the CPU multiplies bfloat16 natively (AVX512-BF16,
    AMX).
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if stored_dtype in ("float16", "bfloat16") and native.available():
            return _DTYPES[stored_dtype]
        # int8 weights: activations in bfloat16 (PyTorch's fallback product is fast with them).
        return torch.bfloat16 if cpu_has_fast_bf16() or quantize else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype: {name!r} is not supported; use auto, float32, bfloat16 or float16")
    return _DTYPES[name]


def single_stream_dtype(name: str, device_name: str, stored_dtype: str | None) -> str:
    """The dtype for one stream at a time (`starchat chat`, `starchat generate`).

    Decoding one sequence reads every weight once per token, so bytes are the cost: on a CPU,
    `auto` keeps a checkpoint stored in 16 bits in 16 bits, where PyTorch's 16-bit matrix-vector
    products run about twice as fast as float32's (measured on an AVX2-only CPU, docs/PERFORMANCE.md).
    Batched serving keeps `auto`'s rule (float32 there), because 16-bit products with many rows
    are slow on CPUs without native 16-bit arithmetic.
    """
    if name != "auto" or resolve_device(device_name).type != "cpu" or stored_dtype not in ("float16", "bfloat16"):
        return name
    return stored_dtype


def default_batched_tokens(device: torch.device) -> int:
    """Tokens one engine step computes at most when the user gave no budget.

    A step's time grows with its tokens, and running sequences wait for it: on a CPU, where a
    prompt token costs about as much as a decoded one, 512 keeps the decode stream moving. A GPU
    computes a prefill chunk at the cost of reading the weights once up to a few hundred tokens,
    and a long prompt cut into 512-token chunks pays for attention over a gathered cache per chunk;
    2048 computes a 2,048-token prompt (or sixteen 128-token ones) in one step.
    """
    return 2048 if device.type == "cuda" else 512


STEP_RESERVE_UNMEASURED = 1 << 30  # a GPU step's own memory when it could not be measured
GRAPHS_AND_SAMPLER_RESERVE = 256 << 20  # CUDA-graph pools and the sampler's temporaries, beyond a step


def default_kv_cache_bytes(device: torch.device, bytes_per_token: int, context_len: int, max_num_seqs: int,
                           step_bytes: int | None = None) -> int:
    """Enough for every sequence at full context if that is small; else a share of free memory.
    On a GPU, what one engine step allocates (`step_bytes`, from profile_step_bytes) is kept free
    for it, plus a margin; a fixed 1 GiB where it was not measured."""
    wanted = bytes_per_token * context_len * max_num_seqs
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        reserve = STEP_RESERVE_UNMEASURED if step_bytes is None else step_bytes + GRAPHS_AND_SAMPLER_RESERVE
        available = int(free * 0.85) - reserve
    else:
        available = min(_available_host_memory() // 5, 2 << 30)
    return max(bytes_per_token * context_len, min(wanted, max(available, 0)))


def _available_host_memory(meminfo: str = "/proc/meminfo", status: str = "/proc/self/status") -> int:
    """Memory the KV cache may take: Linux's MemAvailable less the file pages this process maps
    (RssFile). MemAvailable counts the page cache as reclaimable, including the pages of weights
    the loader maps from a `starchat quantize` folder; a cache sized on them would push the
    weights out of memory to be read back from disk at every step."""
    available = _meminfo_kib(meminfo, "MemAvailable:")
    if available is None:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return max(available - (_meminfo_kib(status, "RssFile:") or 0), 0) * 1024


def _meminfo_kib(path: str, field: str) -> int | None:
    """A "Field:  N kB" line's N from a /proc file, None where there is none."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def profile_step_bytes(model: torch.nn.Module, tokens: int, logits_rows: int, dtype: torch.dtype,
                       device: torch.device) -> int | None:
    """GPU memory that one engine step of `tokens` prompt tokens allocates beyond what is
    allocated now (activations, attention workspace, `logits_rows` rows of logits and their
    log-softmax), measured by running one on dummy tokens before the KV cache exists. None where
    it cannot be measured: not a GPU, or the step failed (the caller then keeps a fixed reserve)."""
    if device.type != "cuda":
        return None
    tokens = max(1, min(tokens, model.config.n_positions))
    try:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        scratch_cache_bytes = run_dummy_step(model, tokens, logits_rows, dtype, device)
        torch.cuda.synchronize(device)
        step = torch.cuda.max_memory_allocated(device) - before - scratch_cache_bytes
    except Exception as error:  # out of memory, or a kernel that fails here: the fixed reserve is used
        logger.warning("could not measure a %d-token step's GPU memory (%s): keeping %d MiB free for it",
                       tokens, error, STEP_RESERVE_UNMEASURED >> 20)
        return None
    finally:
        torch.cuda.empty_cache()
    logger.info("a %d-token step allocates %d MiB of GPU memory beyond the weights", tokens, step >> 20)
    return max(step, 0)


@torch.inference_mode()
def run_dummy_step(model: torch.nn.Module, tokens: int, logits_rows: int, dtype: torch.dtype,
                   device: torch.device) -> int:
    """One prompt chunk of `tokens` zero tokens through `model`, with the logits of its last
    `logits_rows` rows and their log-softmax, as the sampler takes them, into a scratch cache of
    `tokens` slots; returns that cache's bytes."""
    from starchat.engine.kv_cache import allocate_kv_cache
    from starchat.model import AttentionMetadata, PrefillChunk

    scratch_cache = allocate_kv_cache(model.config, 1, tokens, dtype, device)  # one block of `tokens` slots
    metadata = AttentionMetadata(slot_mapping=torch.arange(tokens, device=device), num_decode_tokens=0,
                                 prefill_chunks=[PrefillChunk(0, tokens, 0, None)])
    ids = torch.zeros(tokens, dtype=torch.long, device=device)
    hidden = model(ids, torch.arange(tokens, device=device), metadata, scratch_cache)
    torch.log_softmax(model.compute_logits(hidden[-logits_rows:]), dim=-1)
    return scratch_cache.numel() * scratch_cache.element_size()
