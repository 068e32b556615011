"""Keeping freed host memory in the process, so CPU steps reuse pages instead of faulting in new ones.

A CPU step allocates its activations afresh (a 1,024-token prefill of tiny_starcoder: 6-25 MB
tensors per product) and frees them at the end. glibc's malloc serves blocks over a threshold
with their own mmap and gives them back on free, and trims the top of the heap when it grows past
twice that threshold, both adjusted as it goes: under a CPU engine's mix of sizes it kept
returning memory that the next step then took again, page fault by page fault (5,000-22,000
faults, 20-86 MB, per 1,024-token prefill on the 2-core Xeon; that prefill took 330-430 ms
against 300-320 once the faults stopped). Fixing the thresholds (blocks under 32 MB from the
heap, no trimming below 1 GB of free heap) stops them after a step or two, at the cost of keeping
the activations' peak in the process: what jemalloc or tcmalloc, the allocators usually
recommended for PyTorch on CPUs, do too.

Applied once per process by the CPU model runner; not applied where the C library is not glibc,
where the user set glibc's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, or with
STARCHAT_MALLOC_TUNING=0.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger("starchat.engine")

DISABLE_VARIABLE = "STARCHAT_MALLOC_TUNING"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 1 << 30

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library the interpreter runs on
        libc.gnu_get_libc_version  # present in glibc only (musl has a mallopt that does nothing)
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_host_memory() -> bool:
    """Set glibc's malloc thresholds as above (once per process); whether they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(DISABLE_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False  # the user's own malloc settings stand
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if _applied:
        logger.debug("glibc malloc: blocks under %d MiB from the heap, trimmed past %d MiB free",
                     MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20)
    return _applied
