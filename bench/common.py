"""Shared benchmark plumbing: random checkpoints of named shapes, machine description, timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from starchat.config import NAMED_SHAPES, ModelConfig
from starchat.model.loader import EMBEDDED_MODEL_DIR
from starchat.model.random_checkpoint import write_random_checkpoint

CACHE = Path(os.environ.get("STARCHAT_BENCH_CACHE", "/tmp/starchat-bench"))


def random_checkpoint(shape: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A random-weight checkpoint of a named shape, written once and reused."""
    folder = CACHE / f"{shape}-{str(dtype).removeprefix('torch.')}-seed{seed}"
    if not (folder / "config.json").is_file():
        config = ModelConfig(**NAMED_SHAPES[shape], multi_query=True)
        write_random_checkpoint(folder, config, dtype=dtype, seed=seed, tokenizer_dir=EMBEDDED_MODEL_DIR)
    return folder


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    """Median wall time over repeats (after the caller's warm-up) and the last result."""
    times, result = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")
