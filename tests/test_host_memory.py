"""glibc's malloc thresholds for CPU steps (starchat/engine/host_memory.py), checked in fresh
processes through glibc's own accounting (mallinfo2): with them a 20 MB block comes from the heap
and stays there once freed; without them (STARCHAT_MALLOC_TUNING=0, or the user's own
MALLOC_*_ variables) it is mapped on its own and given back."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from starchat.engine import host_memory

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

    calls = []
    monkeypatch.setattr(runner, "keep_freed_host_memory", lambda: calls.append(1) or True)
    LLM(str(tiny_model_dir), dtype="float32", progress=False)
    assert calls == [1]
