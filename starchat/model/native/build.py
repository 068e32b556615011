"""Compile the C kernels (linear.c, amx.c, decode_attention.c, decode_step.c, prompt_attention.c) for this
machine on first use and load it with ctypes.

The library is built with the system C compiler and -march=native, like llama.cpp's native
builds, so each machine gets its own vector instructions. The result is cached under
`$STARCHAT_CACHE_DIR` (default ~/.cache/starchat) by a key of the source, the compiler and
the CPU's flags, so a home folder shared by different machines never loads a foreign build.
Without a compiler, or with STARCHAT_NATIVE_KERNELS=0, `load()` returns None and callers use
PyTorch's kernels (correct, slower for few rows).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name)
           for name in ("linear.c", "amx.c", "decode_attention.c", "decode_step.c", "prompt_attention.c")]
HEADERS = [Path(__file__).with_name(name) for name in ("convert.h", "kernels.h", "vector_math.h", "amx_tiles.h", "int8_rows.h")]
ABI = 6  # STARCHAT_LINEAR_ABI in linear.c
DISABLE_VARIABLE = "STARCHAT_NATIVE_KERNELS"
EXTRA_FLAGS_VARIABLE = "STARCHAT_NATIVE_CFLAGS"  # extra compiler flags, e.g. "-mno-avx2" for the portable path


def cache_dir() -> Path:
    root = os.environ.get("STARCHAT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "starchat")
    return Path(root) / "native"


def _cpu_signature() -> str:
    """The CPU's model and feature flags (Linux), else what platform reports."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [line for line in lines if line.startswith(("flags", "model name", "Features", "CPU part"))]
        return "\n".join(sorted(set(wanted))) or platform.processor()
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(handle)
    extra = os.environ.get(EXTRA_FLAGS_VARIABLE, "").split()
    base = [compiler, "-O3", "-fPIC", "-shared", "-fopenmp", *map(str, SOURCES), "-o", partial, "-lm"]
    errors = []
    try:
        for arch in (["-march=native"], ["-mcpu=native"], []):
            result = subprocess.run(base[:2] + arch + extra + base[2:], capture_output=True, text=True)
            if result.returncode == 0:
                if errors and arch == []:
                    # A compiler without either flag, or code it rejected: say so, since the
                    # generic build runs without this CPU's vector and AMX instructions.
                    logger.warning("CPU kernels built without -march=native (%s): they run without this CPU's "
                                   "vector extensions", errors[0][0])
                os.replace(partial, target)  # atomic: concurrent builders never load half a file
                return
            errors.append(result.stderr.strip().splitlines()[-1:] or ["(no message)"])
        raise RuntimeError(f"{compiler} could not build {', '.join(s.name for s in SOURCES)}: {errors[-1][0]}")
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernels, built now if needed; None where they cannot be used."""
    if os.environ.get(DISABLE_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    import torch  # noqa: F401  # loads PyTorch's OpenMP runtime first, so the kernels share its threads

    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler found: CPU decoding uses PyTorch's kernels (install gcc for faster few-row products)")
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    texts = [path.read_text() for path in SOURCES + HEADERS]
    flags = os.environ.get(EXTRA_FLAGS_VARIABLE, "")
    key = hashlib.sha256("\0".join((*texts, version, flags, _cpu_signature())).encode()).hexdigest()[:16]
    target = cache_dir() / f"kernels-{key}.so"
    try:
        if not target.exists():
            logger.info("compiling starchat's CPU kernels for this machine (once) into %s", target)
            _compile(compiler, target)
        library = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as error:
        logger.warning("CPU kernels unavailable, using PyTorch's: %s", error)
        return None
    if library.starchat_linear_abi() != ABI:
        logger.warning("CPU kernels at %s have another ABI; using PyTorch's (delete the file to rebuild)", target)
        return None
    library.starchat_linear_has_avx2.restype = ctypes.c_int
    library.starchat_linear_has_avx512.restype = ctypes.c_int
    library.starchat_linear.restype = ctypes.c_int
    library.starchat_linear.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_long,
        ctypes.c_int,
    ]
    library.starchat_amx_init.restype = ctypes.c_int
    library.starchat_amx_init.argtypes = []
    library.starchat_amx_disable.restype = None
    library.starchat_amx_int8_max_rows.restype = ctypes.c_long
    library.starchat_linear_int8_rows_quantized.restype = ctypes.c_int
    library.starchat_linear_int8_rows_quantized.argtypes = []
    library.starchat_amx_int8_max_rows.argtypes = [ctypes.c_long]
    library.starchat_amx_disable.argtypes = []
    library.starchat_decode_attention.restype = ctypes.c_int
    library.starchat_decode_attention.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float,
        ctypes.c_void_p, ctypes.c_int,
    ]
    library.starchat_prompt_attention.restype = ctypes.c_int
    library.starchat_prompt_attention.argtypes = [
        ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_int,
    ]
    library.starchat_unpack_bf16.restype = ctypes.c_int
    library.starchat_unpack_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_long,
                                             ctypes.c_void_p, ctypes.c_int]
    quantize_rows = getattr(library, "starchat_quantize_rows", None)  # absent from older sources (native_ab.py baselines)
    if quantize_rows is not None:
        quantize_rows.restype = ctypes.c_int
        quantize_rows.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_int]
    library.starchat_gelu.restype = ctypes.c_int
    library.starchat_gelu.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int]
    library.starchat_write_cache.restype = ctypes.c_int
    library.starchat_write_cache.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long,
                                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_int,
                                             ctypes.c_int]
    library.starchat_add_layer_norm.restype = ctypes.c_int
    library.starchat_add_layer_norm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long,
                                                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    library.starchat_decode_step.restype = ctypes.c_int
    library.starchat_decode_step.argtypes = [ctypes.POINTER(Model), ctypes.POINTER(Step), ctypes.c_void_p, ctypes.c_void_p,
                                             ctypes.c_int]
    return library


class Linear(ctypes.Structure):
    """`Linear` in decode_step.c."""

    _fields_ = [("weight", ctypes.c_void_p), ("wtype", ctypes.c_int), ("scales", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("amx_min_rows", ctypes.c_long)]


class Layer(ctypes.Structure):
    """`Layer` in decode_step.c (field for field)."""

    _fields_ = [
        ("ln1_weight", ctypes.c_void_p), ("ln1_bias", ctypes.c_void_p), ("ln2_weight", ctypes.c_void_p),
        ("ln2_bias", ctypes.c_void_p), ("c_attn", Linear), ("attn_proj", Linear), ("c_fc", Linear), ("mlp_proj", Linear),
    ]


class Model(ctypes.Structure):
    """`Model` in decode_step.c (field for field)."""

    _fields_ = [
        ("layers", ctypes.c_long), ("embed", ctypes.c_long), ("inner", ctypes.c_long), ("qkv", ctypes.c_long),
        ("vocab", ctypes.c_long), ("heads", ctypes.c_int), ("kv_heads", ctypes.c_int), ("head_dim", ctypes.c_int),
        ("gelu_tanh", ctypes.c_int), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
        ("token_table", ctypes.c_void_p), ("token_type", ctypes.c_int), ("token_table_packed", ctypes.c_int),
        ("token_rows", ctypes.c_long), ("position_table", ctypes.c_void_p), ("position_type", ctypes.c_int),
        ("position_rows", ctypes.c_long), ("lnf_weight", ctypes.c_void_p), ("lnf_bias", ctypes.c_void_p),
        ("lm_head", Linear), ("layer", ctypes.POINTER(Layer)),
    ]


class Step(ctypes.Structure):
    """`Step` in decode_step.c (field for field)."""

    _fields_ = [
        ("rows", ctypes.c_long), ("token_ids", ctypes.c_void_p), ("positions", ctypes.c_void_p),
        ("block_table", ctypes.c_void_p), ("max_blocks", ctypes.c_long), ("block_size", ctypes.c_long),
        ("cache", ctypes.c_void_p), ("cache_type", ctypes.c_int), ("num_slots", ctypes.c_long),
    ]
