"""Host memory for CPU inference (starchat/engine/host_memory.py). glibc's malloc thresholds,
checked in fresh processes through glibc's own accounting (mallinfo2): with them a 20 MB block
comes from the heap and stays there once freed; without them (STARCHAT_MALLOC_TUNING=0, or the
user's own MALLOC_*_ variables) it is mapped on its own and given back. Packed weights collapsed
into 2 MiB pages, checked in the kernel's own accounting (/proc/self/smaps)."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from starchat.engine import host_memory
from starchat.model.huge_pages import THP_SETTING

CHECK = """
import ctypes, json, torch
from starchat.engine.host_memory import keep_freed_host_memory

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
applied = keep_freed_host_memory()
block = torch.empty(5 << 20)  # 20 MB
mapped = libc.mallinfo2().hblkhd  # bytes in blocks mapped on their own
del block
print(json.dumps({"applied": applied, "mapped": mapped >= 20 << 20, "kept": libc.mallinfo2().fordblks >= 20 << 20}))
"""


def _run(**environment) -> dict:
    import json

    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    env.update(environment)
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


needs_glibc = pytest.mark.skipif(host_memory._glibc() is None or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                                 reason="not glibc 2.33+")


@needs_glibc
def test_freed_blocks_stay_in_the_heap():
    assert _run() == {"applied": True, "mapped": False, "kept": True}


@needs_glibc
def test_turned_off_or_left_to_the_users_settings():
    assert _run(STARCHAT_MALLOC_TUNING="0") == {"applied": False, "mapped": True, "kept": False}
    # glibc reads its own variables at start-up: they take effect, ours stay out of the way
    assert _run(MALLOC_MMAP_THRESHOLD_=str(64 << 20))["applied"] is False


def test_a_cpu_engine_applies_them(tiny_model_dir, monkeypatch):
    from starchat import LLM
    from starchat.engine import runner
    from starchat.model.cpu_linear import PackedLinear

    calls, collapsed = [], []
    monkeypatch.setattr(runner, "keep_freed_host_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(runner, "collapse_into_huge_pages", lambda tensors: collapsed.extend(tensors) or 0)
    llm = LLM(str(tiny_model_dir), dtype="float32", progress=False)
    assert calls == [1]
    packed = [m.packed_weight for m in llm.engine.runner.model.modules() if isinstance(m, PackedLinear)]
    assert packed and [t.data_ptr() for t in collapsed] == [t.data_ptr() for t in packed]


def _mapping_bytes_at(address: int, field: str) -> int:
    """A /proc/self/smaps field (Rss, AnonHugePages, ...) of the mapping that holds `address`, in bytes."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and all(c in "0123456789abcdef-" for c in fields[0]):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == f"{field}:":
                return int(fields[1]) * 1024
    return 0


def _huge_bytes_at(address: int) -> int:
    return _mapping_bytes_at(address, "AnonHugePages")


def _kernel_collapses() -> bool:
    release = os.uname().release.split(".")
    return host_memory.huge_pages_allowed() and (int(release[0]), int(release[1].split("-")[0])) >= (6, 1)


@pytest.mark.skipif(not _kernel_collapses(), reason="no transparent huge pages, or a kernel before 6.1 (no MADV_COLLAPSE)")
def test_weights_are_collapsed_into_huge_pages_in_place(monkeypatch):
    import torch

    # 12 MB and 8 MB side by side in a fresh mapping of their own, written in 4 KiB pages (memory
    # from the allocator's heap may have been collapsed by an engine earlier in this process)
    mapping = mmap.mmap(-1, 20 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(mapping, dtype=torch.float32)
    weights = [whole[:3 << 20].normal_(), whole[3 << 20:].normal_()]
    before = [w.clone() for w in weights]
    address = weights[0].data_ptr()
    collapsed = host_memory.collapse_into_huge_pages(weights)
    # every whole 2 MiB page of the 20 MB (the mapping starts 4 KiB-aligned: 9 of them at least)
    assert collapsed >= 9 * (2 << 20) and _huge_bytes_at(address) >= collapsed
    assert weights[0].data_ptr() == address and all(torch.equal(a, b) for a, b in zip(weights, before))
    monkeypatch.setattr(host_memory, "COLLAPSE_MAX_BYTES", 8 << 20)  # weights beyond the cap stay as they are
    assert host_memory.collapse_into_huge_pages([torch.randn(3 << 20)]) == 0
    monkeypatch.setenv("STARCHAT_HUGE_PAGES", "0")
    assert host_memory.collapse_into_huge_pages([torch.randn(1 << 20)]) == 0


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
@pytest.mark.parametrize("huge_pages", ["allowed", "switched off"])
def test_the_kv_cache_is_zeros_faulted_in_as_written(huge_pages, monkeypatch):
    import torch

    if huge_pages == "switched off":
        monkeypatch.setenv("STARCHAT_HUGE_PAGES", "0")
    elif not host_memory.huge_pages_allowed():
        pytest.skip("no transparent huge pages here")

    from starchat.config import ModelConfig
    from starchat.engine.kv_cache import allocate_kv_cache

    config = ModelConfig(vocab_size=100, n_positions=64, n_embd=256, n_layer=4, n_head=4, n_inner=1024)
    cache = allocate_kv_cache(config, num_blocks=1024, block_size=16, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert cache.shape == (4, 2, 16384, config.kv_dim) and cache.dtype == torch.bfloat16
    nbytes = cache.numel() * cache.element_size()
    assert _mapping_bytes_at(cache.data_ptr(), "Rss") < nbytes // 8  # nothing faulted in up front
    assert not cache.any()  # reads as zeros (reading maps the shared zero page, not memory)
    assert _mapping_bytes_at(cache.data_ptr(), "Rss") < nbytes // 8
    cache[0, 0].fill_(1.0)  # the first layer's keys: an eighth of the cache
    assert _mapping_bytes_at(cache.data_ptr(), "Rss") < nbytes // 2
    cache.fill_(1.0)
    assert _mapping_bytes_at(cache.data_ptr(), "Rss") >= nbytes
    if huge_pages == "allowed":
        whole_pages = nbytes // (2 << 20) - 1
        assert _huge_bytes_at(cache.data_ptr()) >= whole_pages * (2 << 20) // 2  # most of it (the host may lack some)
    elif "[always]" not in Path(THP_SETTING).read_text():
        assert _huge_bytes_at(cache.data_ptr()) == 0  # not asked for
