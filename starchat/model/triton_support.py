"""When starchat's Triton kernels run: Triton installed and a CUDA GPU of compute capability 8.0
or newer (bfloat16 tensor-core dot products), or `TRITON_INTERPRET=1` on any device (the tests run
the kernels that way on the CPU). Everywhere else the PyTorch path of the same step runs; setting
`STARCHAT_TRITON_KERNELS=0` picks it on a GPU too (to rule the kernels out when debugging, and for
the benchmarks' same-run baseline)."""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
except ImportError:  # PyTorch's CPU builds come without Triton
    triton = None


# Read when a model is loaded (the runner decides then which decode addressing to build).
ENABLED = os.environ.get("STARCHAT_TRITON_KERNELS", "1") != "0"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _device_supported(index: int) -> bool:
    major, _ = torch.cuda.get_device_capability(index)
    return major >= 8


def runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can take tensors on `device`."""
    if triton is None or not ENABLED:
        return False
    if interpreting():
        return True
    return device.type == "cuda" and _device_supported(device.index or 0)
