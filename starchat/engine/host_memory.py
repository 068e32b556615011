"""Host memory for CPU inference: freed memory kept in the process, so steps reuse pages instead of
faulting in new ones, and packed weights backed by 2 MiB pages.

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

Huge pages: a packed model's weights, read in full for every decode step, sat in 4 KiB pages
scattered by the load; decoding tiny_starcoder (328 MB in bfloat16) ran at 63-65 tokens/s as
loaded and 79-81 once the same weights were backed by 2 MiB pages (the 2-core Xeon, whose L3 is
reported as 480 MiB: physically contiguous weights share the cache more evenly, and a step walks
512x fewer pages). Copying the weights did not help by itself unless the copy happened to land
late in the process's life. After packing, `collapse_into_huge_pages` asks the kernel to back
the weights' whole 2 MiB pages with huge pages in place (MADV_COLLAPSE, Linux 6.1+: it copies each
into a huge page, no second copy of the model), for weights up to COLLAPSE_MAX_BYTES. The KV
cache is a fresh mapping advised as huge pages before it is touched (`lazy_zeros`), and faulted
in as blocks are first written (faulting in huge pages ran at about 0.9 GiB/s here against 3.3 for
4 KiB pages: zeroing the default 2 GiB up front took 2.3 s per engine). Skipped where transparent huge pages are set to "never", on older
kernels (the call fails and nothing changes), or with STARCHAT_HUGE_PAGES=0.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
import time

import torch

from starchat.model.huge_pages import advise_huge_pages, huge_pages_allowed, switched_off

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
    if switched_off(DISABLE_VARIABLE):
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


HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25  # linux/mman.h, Linux 6.1+
MERGE_GAP = 4096
# Weights beyond this are left in their pages: the kernel copies each page it collapses (0.7 GiB/s
# on the 2-core Xeon: 23 s for StarChat-beta in int8), and the gain was measured on a model that
# nearly fits the last-level cache (tiny_starcoder), not on ones that stream from memory.
COLLAPSE_MAX_BYTES = 4 << 30


def collapse_into_huge_pages(tensors: list[torch.Tensor]) -> int:
    """Back the CPU tensors' memory with 2 MiB pages in place, where the kernel can: every whole
    huge page inside their bytes, neighbours up to MERGE_GAP apart taken as one (the allocator's
    headers between blocks allocated one after another: 64 bytes on its heap, a 4 KiB page before
    each block it maps on its own; both in use, so collapsing them costs no memory). Returns the
    bytes collapsed (0 where huge pages are not allowed or the kernel has no MADV_COLLAPSE)."""
    if not huge_pages_allowed():
        return 0
    total = sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cpu")
    if total > COLLAPSE_MAX_BYTES:
        logger.info("weights: %.1f GiB left in 4 KiB pages (2 MiB pages only up to %d GiB: collapsing copies each page)",
                    total / 2**30, COLLAPSE_MAX_BYTES >> 30)
        return 0
    spans: list[list[int]] = []
    for start, end in sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                             for t in tensors if t.device.type == "cpu" and t.numel()):
        if spans and start - spans[-1][1] <= MERGE_GAP:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    libc = ctypes.CDLL(None)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    started, collapsed = time.perf_counter(), 0
    for start, end in spans:
        for page in range(-(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE, HUGE_PAGE):
            if libc.madvise(page, HUGE_PAGE, MADV_COLLAPSE) == 0:  # failures (an older kernel) change nothing
                collapsed += HUGE_PAGE
    seconds = time.perf_counter() - started
    (logger.info if seconds > 1 else logger.debug)("weights: %.1f GiB backed by 2 MiB pages in %.1f s", collapsed / 2**30, seconds)
    return collapsed


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros on the CPU whose memory is faulted in as it is first written: the KV cache. A
    fresh anonymous mapping reads as zeros, so nothing is written here; zeroing it (torch.zeros)
    would fault in every page up front (2.3 s per engine for the CPU's default 2 GiB cache in huge
    pages on the 2-core Xeon, 0.6 s in 4 KiB ones) and hold memory the cache may never fill.
    A mapping of its own also because memory from the allocator's heap may have been touched
    already: where huge pages are allowed (huge_pages_allowed), its 2 MiB pages are asked for as
    huge pages before anything touches them (MADV_HUGEPAGE; nothing is copied). Decode steps read
    scattered blocks of every layer: one layer of StarChat-beta's decode attention, 32 sequences of
    1,024 tokens over a bfloat16 cache, took 3.0-3.2 against 3.5 ms in 4 KiB pages on that Xeon.
    Plain torch.zeros below one huge page or where there is no anonymous mmap."""
    count = 1
    for size in shape:
        count *= size
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros(shape, dtype=dtype)
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive
    offset = -whole.data_ptr() % HUGE_PAGE
    advise_huge_pages(mapping, offset, nbytes // HUGE_PAGE * HUGE_PAGE)
    return whole[offset:offset + nbytes].view(dtype).view(shape)
