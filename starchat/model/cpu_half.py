"""16-bit weights on a CPU without native 16-bit arithmetic: one-row products stay 16-bit,
many-row products run in float32.

PyTorch's 16-bit matrix product on such CPUs costs about one matrix-vector product per row
(measured on an AVX2 EPYC for a 3072 x 768 layer: 0.28 ms for 1 row, 8 ms for 32, 32 ms for
128), while its float32 GEMM is efficient. So a product with many rows (a prefill chunk, a
batch of decodes) converts the weight to float32 for that call (0.8 ms for this layer) and
multiplies in float32: 3.7 ms for 32 rows, 10 ms for 128. One sequence decoding keeps the cheap
16-bit matrix-vector product. Outputs stay in the model dtype; the weights stay 16-bit in memory.
Applied to a built model by the loader (the network code never knows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROWS_FOR_FLOAT32 = 8  # measured crossover: 8 rows cost the same both ways


class ManyRowsInFloat32Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] < ROWS_FOR_FLOAT32:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def cpu_has_fast_bf16() -> bool:
    """bf16 beats float32 on CPUs with native bf16 dot products (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    cpu = getattr(torch._C, "_cpu", None)
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks) if cpu else False


def wants_float32_for_many_rows(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) and not cpu_has_fast_bf16()


def use_float32_for_many_rows(model: nn.Module) -> None:
    """Every plain nn.Linear of `model` becomes a ManyRowsInFloat32Linear (same parameters)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = ManyRowsInFloat32Linear
