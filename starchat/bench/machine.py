"""What machine a figure was measured on, and how fast its memory is."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch


def describe_machine(device: torch.device | str = "cpu") -> dict:
    info = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if torch.device(device).type == "cpu":
        # Which product kernels a CPU figure measured: the native kernels' AMX tiles change it 2-7x.
        from starchat.model import cpu_linear, native

        info["native_kernels"] = native.available()
        info["amx_tiles"] = native.available() and cpu_linear.native_amx_tiles()
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def measure_read_bandwidth(device: torch.device | str = "cpu", size_mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large copy (read + write counted), best of `repeats`."""
    device = torch.device(device)
    source = torch.empty(size_mib << 18, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
