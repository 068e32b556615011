"""int8 weight-only quantization, applied to a built model (the network code never knows).

Each Linear's weight becomes int8 with one float scale per output channel (symmetric,
scale = max|w_row| / 127); activations stay in the model dtype. On CPU, products of few rows
(decoding) run in starchat's native kernel, which reads the int8 weight directly (a quarter of
float32's bytes per decoded token); many rows (prefill) dequantize the layer to float32 for the
call (one layer's float32 copy at a time: 0.6 GB for StarChat-beta's largest) and use PyTorch's
GEMM, which beats `_weight_int8pack_mm` there by 20x or more (bench/cpu_kernels.py). On a GPU
the weight is dequantized per call (correct, not fast). Weights are quantized one tensor at a
time while loading, so a 16B model never needs its float weights in memory at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from starchat.model import native
from starchat.model.cpu_linear import native_row_limit

QUANTIZATION_METHODS = ("int8",)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight (out, in), float32 scales (out,)) with weight ~= int8 * scales[:, None]."""
    weight = weight.float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    quantized = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return quantized, scales


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    def load_float_weight(self, weight: torch.Tensor) -> None:
        quantized, scales = quantize_per_channel(weight)
        self.weight = nn.Parameter(quantized, requires_grad=False)
        self.scales = nn.Parameter(scales.to(self.scales.dtype), requires_grad=False)
        self._vectors = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "Int8Linear":
        module = cls(weight.shape[1], weight.shape[0], bias is not None, dtype, device=weight.device)
        module.load_float_weight(weight)
        if bias is not None:
            module.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            if x.numel() // self.in_features <= native_row_limit(torch.int8):
                scales, bias = self._float32_vectors()
                return native.linear(x, self.weight, bias, scales)
            weight = self.weight.float() * self.scales.float()[:, None]
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), weight, bias).to(x.dtype)
        out = F.linear(x, self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        return out + self.bias if self.bias is not None else out

    def _float32_vectors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float32 copies of scales and bias for the native kernel, made once (weights are frozen)."""
        if getattr(self, "_vectors", None) is None:
            bias = None if self.bias is None else self.bias.detach().float().contiguous()
            self._vectors = (self.scales.detach().float().contiguous(), bias)
        return self._vectors


def prepare_int8(model: nn.Module, dtype: torch.dtype, skip: tuple[str, ...] = ("lm_head",)) -> None:
    """Swap every nn.Linear (but `skip`) for an empty Int8Linear, before weights are loaded."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full not in skip:
                replacement = Int8Linear(child.in_features, child.out_features, child.bias is not None, dtype,
                                         device=child.weight.device)
                setattr(module, child_name, replacement)
