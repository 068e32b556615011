"""Linear layers on a CPU: each product takes the kernel that is fastest for its number of rows.

- Few rows (decoding one or a few sequences): starchat's native kernels (`native/linear.c`),
  which read each weight once in its stored dtype (float32, float16, bfloat16, int8) and are
  bound by memory bandwidth. PyTorch's product for one row is a GEMV that reaches about half
  this CPU's bandwidth in float32, and for 16-bit weights costs one GEMV per row.
- Many rows (prefill chunks, large decode batches): PyTorch's GEMM. On CPUs without native
  16-bit arithmetic, 16-bit weights are widened to float32 for that call (0.8 ms for a
  3072 x 768 layer) because PyTorch's 16-bit product there costs a GEMV per row.
The crossovers come from `bench/cpu_kernels.py` on an AVX2 EPYC (docs/PERFORMANCE.md). The
loader applies this to a built CPU model; the network code never knows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from starchat.model import native

ROWS_FOR_FLOAT32 = 8  # measured: from 8 rows, widening 16-bit weights to float32 pays for itself
# Up to this many rows the native kernel beats PyTorch (bench/cpu_kernels.py). For float32
# weights MKL's GEMM catches up around 32 rows, where the fused decode path (cpu_decode.py) still
# wins end to end: 85 vs 75 output tokens/s for 32 concurrent requests on tiny_starcoder.
NATIVE_ROWS = {torch.float32: 32, torch.float16: 32, torch.bfloat16: 32, torch.int8: 32}


def cpu_has_fast_bf16() -> bool:
    """bf16 beats float32 on CPUs with native bf16 dot products (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    cpu = getattr(torch._C, "_cpu", None)
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks) if cpu else False


def wants_float32_for_many_rows(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) and not cpu_has_fast_bf16()


def native_row_limit(weight_dtype: torch.dtype) -> int:
    """How many rows a product may have to take the native kernel; 0 where it is unavailable."""
    return NATIVE_ROWS.get(weight_dtype, 0) if native.available() else 0


class CpuLinear(nn.Linear):
    """nn.Linear whose forward picks the kernel by row count (set up by `prepare_cpu_linears`)."""

    native_rows: int = 0
    many_rows_in_float32: bool = False
    bias_float32: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows <= self.native_rows:
            return native.linear(x, self.weight, self.bias_float32)
        if self.many_rows_in_float32 and rows >= ROWS_FOR_FLOAT32:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def prepare_cpu_linears(model: nn.Module) -> None:
    """Every plain nn.Linear of a built CPU `model` becomes a CpuLinear (same parameters)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = CpuLinear
            module.native_rows = native_row_limit(module.weight.dtype) if module.weight.is_contiguous() else 0
            module.many_rows_in_float32 = wants_float32_for_many_rows(module.weight.device, module.weight.dtype)
            module.bias_float32 = None if module.bias is None else module.bias.detach().float().contiguous()
