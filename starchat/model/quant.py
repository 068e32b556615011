"""int8 weight-only quantization, applied to a built model (the network code never knows).

Each Linear's weight becomes int8 with one float scale per output channel (symmetric,
scale = max|w_row| / 127); activations stay in the model dtype. On CPU with starchat's native
kernels the loader then packs each int8 weight (cpu_linear.PackedLinear) and every product reads
it directly: a quarter of float32's bytes per decoded token, widened to float32 per panel in cache
for many rows. On an Ampere or newer GPU with Triton, products of up to triton_linear.MAX_ROWS
rows (decode steps) run triton_linear's kernel, which reads the int8 weight itself. Elsewhere (more
rows, older GPUs, CPUs without the native kernels) the weight is dequantized per call: correct,
and for prefill chunks cheap beside the product. Weights are quantized one tensor at a time while
loading, so a 16B model never needs its float weights in memory at once.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from starchat.model.native import NONFINITE_WEIGHT

QUANTIZATION_METHODS = ("int8",)


QUANTIZE_ROWS_PER_PASS = 2048  # float32 temporaries of at most 2,048 rows (50 MB at StarChat-beta's width)


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight (out, in), float32 scales (out,)) with weight ~= int8 * scales[:, None].

    Rows are quantized a slice at a time: a whole float32 copy of StarChat-beta's 49,156-row
    lm_head, and the temporaries of dividing and rounding it, came to 3.6 GB at the end of a load
    that must fit in 20 GB of host memory (bench/load_memory.py). On a CPU with starchat's native
    kernels, their one-pass version gives the same bits, x6-x8 faster (a 4-layer StarChat-beta
    spent 9.8 of its 13.6 s load quantizing, now 1.5 of 6.6)."""
    if weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
        from starchat.model import native

        if native.available():
            return native.quantize_per_channel(weight.contiguous())
    return quantize_in_slices(weight)


def quantize_in_slices(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_channel in PyTorch operations, QUANTIZE_ROWS_PER_PASS rows at a time (any device)."""
    out_features = weight.shape[0]
    quantized = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    for start in range(0, out_features, QUANTIZE_ROWS_PER_PASS):
        rows = slice(start, start + QUANTIZE_ROWS_PER_PASS)
        block = weight[rows].to(torch.float32, copy=True)  # divided in place below: never a view of weight
        if not torch.isfinite(block).all():
            raise ValueError(NONFINITE_WEIGHT)
        block_scales = block.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        quantized[rows] = torch.round(block.div_(block_scales[:, None])).clamp_(-127, 127)
        scales[rows] = block_scales
    return quantized, scales


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.tuned: dict = {}  # row bucket -> GPU kernel blocks, set by tuned_linear at load

    def kernel_choice(self, x: torch.Tensor) -> tuple[bool, tuple | None]:
        """(whether the GPU kernel computes x's product, its blocks). Untuned (tuned_linear never
        ran: the kernel's built-in blocks); tuned: the blocks chosen for x's row bucket, or the
        dequantizing product where that was faster or no candidate ran."""
        if not self.tuned:
            return True, None
        from starchat.model.tuned_linear import row_bucket

        blocks = self.tuned.get(row_bucket(x))
        return blocks is not None, blocks

    def load_float_weight(self, weight: torch.Tensor) -> None:
        quantized, scales = quantize_per_channel(weight)
        self.weight = nn.Parameter(quantized, requires_grad=False)
        self.scales = nn.Parameter(scales.to(self.scales.dtype), requires_grad=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "Int8Linear":
        module = cls(weight.shape[1], weight.shape[0], bias is not None, dtype, device=weight.device)
        module.load_float_weight(weight)
        if bias is not None:
            module.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return module

    def forward(self, x: torch.Tensor, gelu_tanh: bool = False) -> torch.Tensor:
        """x @ dequantized weight.T + bias, then the tanh GELU if `gelu_tanh` (in the GPU kernel's
        epilogue where it runs)."""
        # The kernel takes CPU tensors only under Triton's interpreter (the tests). Read here, not
        # through triton_support.interpreting(): importing that module imports Triton, slow on CPUs.
        on_gpu_path = x.device.type != "cpu" or os.environ.get("TRITON_INTERPRET") == "1"
        kernels = _gpu_kernels() if on_gpu_path else None
        if kernels is not None and kernels.supports(x):
            use_kernel, blocks = self.kernel_choice(x)
            if use_kernel:
                return kernels.linear(x, self.weight, self.scales, self.bias, blocks, gelu_tanh=gelu_tanh)
        return self.dequantized_product(x, gelu_tanh)

    def dequantized_product(self, x: torch.Tensor, gelu_tanh: bool = False) -> torch.Tensor:
        """The portable product: the weight dequantized for this call, then PyTorch's product."""
        if x.device.type == "cpu":  # PyTorch's CPU products are fastest in float32 (no native kernels here)
            weight = self.weight.float() * self.scales.float()[:, None]
            bias = None if self.bias is None else self.bias.float()
            out = F.linear(x.float(), weight, bias).to(x.dtype)
        else:
            out = F.linear(x, self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None])
            out = out + self.bias if self.bias is not None else out
        return F.gelu(out, approximate="tanh") if gelu_tanh else out


@functools.lru_cache(maxsize=1)
def _gpu_kernels():
    """starchat.model.triton_linear, imported on the first GPU product (Triton takes a while to import)."""
    from starchat.model import triton_linear

    return triton_linear if triton_linear.triton is not None else None


def prepare_int8(model: nn.Module, dtype: torch.dtype, skip: tuple[str, ...] = ("lm_head",)) -> None:
    """Swap every nn.Linear (but `skip`) for an empty Int8Linear, before weights are loaded."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full not in skip:
                replacement = Int8Linear(child.in_features, child.out_features, child.bias is not None, dtype,
                                         device=child.weight.device)
                setattr(module, child_name, replacement)
