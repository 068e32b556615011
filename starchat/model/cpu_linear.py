"""Linear layers on a CPU, set up once a model is built (the network code never knows).

With starchat's native kernels (native/linear.c) every Linear, float or int8, becomes a
`PackedLinear`: its weight is packed once into panels of 16 output columns, in its stored dtype
(float32, float16, bfloat16, or int8 with a scale per output channel), and every product runs in
the native kernel, from one row (decoding: bound by reading the weights) to a prefill chunk of
hundreds (a register-tiled outer product: 1.3-1.6x PyTorch's float32 GEMM on the AVX2 EPYC of
docs/PERFORMANCE.md, with no per-call widening of 16-bit or int8 weights). An embedding table
tied to the lm_head is stored once, packed, and looked up from the panels (`PackedEmbedding`).

Without the kernels (no C compiler, or STARCHAT_NATIVE_KERNELS=0) plain Linears become
`CpuLinear`s on PyTorch's products; on CPUs without native 16-bit arithmetic, 16-bit weights are
widened to float32 for products of many rows there (PyTorch's 16-bit product costs a GEMV per row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from starchat.model import native
from starchat.model.quant import Int8Linear

ROWS_FOR_FLOAT32 = 8  # measured: from 8 rows, widening 16-bit weights to float32 pays for itself


def cpu_has_fast_bf16() -> bool:
    """bf16 beats float32 on CPUs with native bf16 dot products (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    cpu = getattr(torch._C, "_cpu", None)
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks) if cpu else False


def wants_float32_for_many_rows(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) and not cpu_has_fast_bf16()


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class PackedLinear(nn.Module):
    """A Linear whose weight is packed for the native kernels (see the module docstring)."""

    def __init__(self, packed_weight: torch.Tensor, out_features: int, bias: torch.Tensor | None,
                 scales: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = packed_weight.shape[1], out_features
        self.packed_weight = _frozen(packed_weight)
        # The kernel takes float32 vectors; int8 weights carry their per-channel scales.
        self.bias = None if bias is None else _frozen(bias.detach().float().contiguous())
        self.scales = None if scales is None else _frozen(scales.detach().float().contiguous())

    @classmethod
    def from_module(cls, module: nn.Linear | Int8Linear, in_place: bool = False,
                    scratch: torch.Tensor | None = None) -> "PackedLinear":
        """`in_place`: pack in the weight's own storage where its shape allows (the weight is then
        unusable elsewhere), staging panels through `scratch` (see native.pack_weight_in_place)."""
        scales = module.scales if isinstance(module, Int8Linear) else None
        weight = module.weight.detach()
        if in_place and weight.shape[0] % native.PANEL == 0 and weight.is_contiguous():
            packed = native.pack_weight_in_place(weight, scratch)
        else:
            packed = native.pack_weight(weight)
        return cls(packed, module.out_features, module.bias, scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return native.linear(x, self.packed_weight, self.out_features, self.bias, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.packed_weight.dtype}"


class PackedEmbedding(nn.Module):
    """An embedding table that is also a packed lm_head's weight: rows are read from the panels."""

    def __init__(self, lm_head: PackedLinear):
        super().__init__()
        self.packed_weight = lm_head.packed_weight  # the same Parameter: stored once
        self.num_embeddings, self.embedding_dim = lm_head.out_features, lm_head.in_features

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return native.unpack_rows(self.packed_weight, token_ids)


class CpuLinear(nn.Linear):
    """nn.Linear on PyTorch's products, with 16-bit weights widened for many rows where that is faster."""

    many_rows_in_float32: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.many_rows_in_float32 and x.numel() // self.in_features >= ROWS_FOR_FLOAT32:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def prepare_cpu_linears(model: nn.Module) -> None:
    """Set up every Linear of a built CPU `model` for the fastest products available (see above).

    With the native kernels the model's Linear weights are consumed: packed in their own storage
    where possible, so nothing else may keep using them."""
    if not native.available():
        for module in model.modules():
            if type(module) is nn.Linear:
                module.__class__ = CpuLinear
                module.many_rows_in_float32 = wants_float32_for_many_rows(module.weight.device, module.weight.dtype)
        return
    # Each weight is packed in its own storage where its shape allows (out_features a multiple of
    # 16: every layer of the StarCoder family but an lm_head of 49,156 tokens), through one reused
    # scratch buffer, else copied, one layer at a time with no reference kept to a replaced layer.
    # Copies, even freed at once, left the allocator holding more memory: tiny_starcoder's load
    # peak rose from 1.24x to 1.49x its weights (bf16; bench/load_memory.py), and temporaries of
    # a different size per layer to 1.9x in some runs. A weight tied to an embedding table stays alive
    # through the table until the table is swapped below, so its id stays unique.
    packed_by_weight: dict[int, PackedLinear] = {}
    scratch = torch.empty(16 << 20, dtype=torch.uint8)
    for parent, names in _children_of_type(model, (nn.Linear, Int8Linear)):
        for name in names:
            weight_id = id(getattr(parent, name).weight)
            packed_by_weight[weight_id] = PackedLinear.from_module(getattr(parent, name), in_place=True, scratch=scratch)
            setattr(parent, name, packed_by_weight[weight_id])
    for parent, names in _children_of_type(model, (nn.Embedding,)):  # tables tied to a packed weight
        for name in names:
            packed = packed_by_weight.get(id(getattr(parent, name).weight))
            if packed is not None:
                setattr(parent, name, PackedEmbedding(packed))


def _children_of_type(model: nn.Module, types: tuple[type, ...]) -> list[tuple[nn.Module, list[str]]]:
    """(parent, names of its direct children of exactly these types), holding no child itself."""
    found = []
    for parent in model.modules():
        names = [name for name, child in parent.named_children() if type(child) in types]
        if names:
            found.append((parent, names))
    return found


def compute_in_float32(model: nn.Module) -> None:
    """Activations of a packed CPU model in float32 whatever its weight dtype.

    The packed products read 16-bit and int8 weights and compute in float32 anyway; this keeps
    their inputs and outputs in float32 too, so the rest of a prefill step (layer norms, GELU,
    attention) runs on PyTorch's float32 CPU kernels instead of its much slower 16-bit ones,
    and nothing is rounded to 16 bits between layers (as in the fused decode path). The KV cache
    keeps the model dtype. Only the layer norms and the position table become float32; token
    embeddings stay as stored and are promoted when the positions are added.
    """
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.float()
    model.transformer.wpe.float()
