"""Linear layers on a CPU, set up once a model is built (the network code never knows).

With starchat's native kernels (native/linear.c) every Linear, float or int8, becomes a
`PackedLinear`: its weight is packed once into panels of 16 output columns, in its stored dtype
(float32, float16, bfloat16, or int8 with a scale per output channel), and every product runs in
the native kernel, from one row (decoding: bound by reading the weights) to a prefill chunk of
hundreds (a register-tiled outer product: 1.3-1.6x PyTorch's float32 GEMM on the AVX2 EPYC of
docs/PERFORMANCE.md, with no per-call widening of 16-bit or int8 weights). An embedding table
tied to the lm_head is stored once, packed, and looked up from the panels (`PackedEmbedding`).

On a CPU with AMX tiles, products of 8 rows and more over bfloat16 or int8 weights run on AMX
tiles: up to about a thousand rows (decode steps of many sequences, prompt chunks up to the CPU's
default 512 tokens) in the native library, straight from the panels (native/amx.c); larger
prompt chunks on oneDNN's bf16 tile kernels (`PackedLinear._amx_forward`), the weight unpacked
per call. Either way the activations are rounded to bfloat16 for the product. float16 weights
run on the panels' AMX tiles from 12 rows at any size, each weight split into two bfloat16 halves
that sum to it exactly and each activation into two that keep 16 bits of its significand (three
tile products: more precise than float16 activations, and no weight rounded).

Without the kernels (no C compiler, or STARCHAT_NATIVE_KERNELS=0) plain Linears become
`CpuLinear`s on PyTorch's products; on CPUs without native 16-bit arithmetic, 16-bit weights are
widened to float32 for products of many rows there (PyTorch's 16-bit product costs a GEMV per row).
"""

from __future__ import annotations

import functools
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from starchat.model import native
from starchat.model.quant import Int8Linear

ROWS_FOR_FLOAT32 = 8  # measured: from 8 rows, widening 16-bit weights to float32 pays for itself
# On a CPU with AMX, bfloat16 and int8 products of this many rows and more run on AMX tiles from
# the packed panels (native/amx.c). One tiny_starcoder layer's four bfloat16 products (with their
# biases) on a 2-core Xeon: 0.36 against 0.38 ms at 8 rows, 0.34 against 1.10 at 16, 0.59 against
# 2.9 at 64, 3.9 against 23.7 at 512; below 8 the native tiles win (0.27 against 0.36 at 4 rows:
# one row's weights are read either way, and building B tiles costs more).
NATIVE_AMX_MIN_ROWS = 8
# int8 weights on AMX-INT8 tiles (their B tiles the panels' bytes permuted) against the native
# kernel's VNNI rows: 0.30-0.32 against 0.32-0.34 ms at 6 rows, 0.31-0.32 against 0.41-0.42 at 8,
# level at 5, 0.30-0.31 against 0.27-0.28 at 4 (session 16).
NATIVE_AMX_MIN_ROWS_INT8 = 6
# float16 weights (split into two bfloat16 halves, three tile products): 0.44 against 0.44 ms at
# 10 rows, 0.44 against 0.52 at 12, 0.45 against 1.08 at 16, 2.1 against 5.7 at 128, 7.9 against
# 23.9 at 512; they never go to oneDNN (it would round the weights to bfloat16).
NATIVE_AMX_MIN_ROWS_FLOAT16 = 12
# Those were measured with the weights in the CPU's last-level cache (tiny_starcoder's 328 MB in
# that Xeon's 480 MiB). A model larger than that cache streams its weights from memory at every
# step, where the native tiles' cost per row shows sooner against AMX's flat one: one StarChat-beta
# layer, AMX against native tiles, bfloat16 x1.03 / x1.14 / x1.19 at 4 / 6 / 8 rows, int8 x1.11 /
# x1.26 at 4 / 6, float16 x1.03 / x1.06 / x1.11 at 6 / 8 / 10 (bench/cpu_amx_layer.py).
STREAMED_AMX_MIN_ROWS = {torch.bfloat16: 6, torch.int8: 4, torch.float16: 8}
# From this many rows, oneDNN's tile kernels over the weight unpacked per call win instead (its
# cache blocking for large products): one layer's bfloat16 products 8.1 against 12.3 ms at 1,024
# rows, 15.5 against 14.9 at 1,536, 23.4 against 19.1 at 2,048 (int8 alike). The CPU's default
# prompt chunk (512 tokens) stays on the panels. (At StarChat-beta's shape the panels win further
# out: unpacking a layer alone takes 200 ms; 487 against 681 ms at 1,024 rows.)
AMX_MIN_ROWS = 1280


def _cpu_feature(name: str) -> bool:
    check = getattr(torch.cpu, name, None) or getattr(getattr(torch._C, "_cpu", None), name, None)
    return bool(check()) if check is not None else False


def cpu_has_fast_bf16() -> bool:
    """bf16 beats float32 on CPUs with native bf16 dot products (AVX512-BF16 or AMX)."""
    return _cpu_feature("_is_avx512_bf16_supported") or _cpu_feature("_is_amx_tile_supported")


def _amx_allowed() -> bool:
    """The CPU has AMX tiles and STARCHAT_CPU_AMX is not 0."""
    return os.environ.get("STARCHAT_CPU_AMX", "1") != "0" and _cpu_feature("_is_amx_tile_supported")


def _fastest(product) -> float:
    times = []
    for _ in range(4):
        start = time.perf_counter()
        product()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def _timing_case(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny_starcoder-sized bfloat16 weight (packed) and `rows` activations to time products on."""
    generator = torch.Generator().manual_seed(0)
    packed = native.pack_weight(torch.randn(3072, 768, generator=generator).to(torch.bfloat16))
    return packed, torch.randn(rows, 768, generator=generator)


@functools.lru_cache(maxsize=1)
def amx_products_pay_off() -> bool:
    """Whether prefill-sized bf16 products go to oneDNN's AMX kernels here: AMX is allowed
    (above) and (timed once per process, a few milliseconds) unpacking a tiny_starcoder-sized
    weight and multiplying 128 rows on them takes under 0.7x the native kernel's time (AMX
    present but unusable, e.g. not enabled by the OS, fails that)."""
    if not _amx_allowed():
        return False
    packed, rows = _timing_case(128)
    native_time = _fastest(lambda: native.linear(rows, packed, 3072))
    amx_time = _fastest(lambda: F.linear(rows.to(torch.bfloat16), unpack_weight(packed, 3072, torch.bfloat16)))
    return amx_time < 0.7 * native_time


@functools.lru_cache(maxsize=1)
def native_amx_tiles() -> bool:
    """Whether bfloat16, int8 and float16 products run on the panels' AMX tiles here (amx.c): AMX
    is allowed, the kernel grants the native library the tile state, and (timed once per process,
    about a millisecond) 32 rows on them beat the native AVX tiles. Independent of oneDNN's check
    above: this path is the library's own. The tile state, once granted, also puts decode
    attention over 16-bit caches on AMX tiles (native/amx.c); a failed timing takes it back."""
    if not _amx_allowed() or not native.amx_init():
        return False
    packed, rows = _timing_case(32)
    native_time = _fastest(lambda: native.linear(rows, packed, 3072))
    amx_time = _fastest(lambda: native.linear(rows, packed, 3072, amx_min_rows=1))
    if amx_time >= native_time:
        native.amx_disable()  # the decode attention's tiles too
        return False
    return True


def native_amx_min_rows(weight_dtype: torch.dtype, streamed: bool = False) -> int:
    """From how many rows a product over packed weights of this dtype runs on the panels' AMX
    tiles here (0: never); `streamed`: the model's weights exceed the last-level cache."""
    if not native_amx_tiles() or weight_dtype not in STREAMED_AMX_MIN_ROWS:
        return 0
    if streamed:
        return STREAMED_AMX_MIN_ROWS[weight_dtype]
    return {torch.float16: NATIVE_AMX_MIN_ROWS_FLOAT16, torch.int8: NATIVE_AMX_MIN_ROWS_INT8}.get(weight_dtype,
                                                                                                NATIVE_AMX_MIN_ROWS)


def last_level_cache_bytes() -> int:
    """The largest CPU cache Linux reports (sysfs), else 32 MiB."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip() if entry.is_file() else ""
        if text[:-1].isdigit() and text[-1] in "KMG":
            sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]])
    return max(sizes, default=32 << 20)


def streams_its_weights(model: nn.Module) -> bool:
    """Whether a packed model's weights exceed the last-level cache, so every step reads them
    from memory (see STREAMED_AMX_MIN_ROWS)."""
    weight_bytes = sum(m.packed_weight.numel() * m.packed_weight.element_size()
                       for m in model.modules() if isinstance(m, PackedLinear))
    return weight_bytes > last_level_cache_bytes()


def unpack_weight(packed: torch.Tensor, out_features: int, dtype: torch.dtype, workspace: Workspace | None = None) -> torch.Tensor:
    """The (out_features, K) weight held in `packed`'s panels, converted to `dtype` on the way
    (int8 values are exact in bfloat16); bfloat16 into the workspace's buffer where given."""
    if dtype == torch.bfloat16 and packed.dtype in (torch.bfloat16, torch.int8) and native.available():
        out = workspace.take((out_features, packed.shape[1]), dtype) if workspace is not None else None
        return native.unpack_bf16(packed, out_features, out)  # register transposes: 2.4x PyTorch's permuted copy
    panels, in_features, width = packed.shape
    weight = torch.empty(panels * width, in_features, dtype=dtype)
    weight.view(panels, width, in_features).copy_(packed.permute(0, 2, 1))
    return weight[:out_features]


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
        self.mapped_from_file = False  # set by the loader for a panels folder's weights, used where they lie
        # The kernel takes float32 vectors; int8 weights carry their per-channel scales.
        self.bias = None if bias is None else _frozen(bias.detach().float().contiguous())
        self.scales = None if scales is None else _frozen(scales.detach().float().contiguous())
        # On a CPU with AMX: bfloat16 and int8 products of 8+ rows on AMX tiles, from the panels
        # (amx_min_rows, in the native library) or, for large prompt chunks, on oneDNN's
        # (amx_products); float16 ones from 12 rows on the panels' tiles only.
        self.amx_products = packed_weight.dtype in (torch.bfloat16, torch.int8) and amx_products_pay_off()
        self.amx_min_rows = native_amx_min_rows(packed_weight.dtype)
        # Where the unpacked weight of an oneDNN product goes: one buffer the model's layers share
        # (prepare_cpu_linears), else a new tensor per call. StarChat-beta's mlp.c_fc at 2,048
        # rows: unpacking 30 against 97 ms into fresh memory; the product 487 against 558 ms.
        self.unpack_workspace: Workspace | None = None
        # Set on an MLP's up projection (compute_in_float32): its output goes into a buffer all the
        # model's up projections share (dead once the down projection has read it).
        self.output_workspace: Workspace | None = None

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

    def forward(self, x: torch.Tensor, gelu_tanh: bool = False) -> torch.Tensor:
        """x @ weight.T (* scales) + bias; with `gelu_tanh`, then the tanh GELU (an MLP's up
        projection, compute_in_float32): in the native product's stores, while each panel's
        results are in L1, rather than a pass of its own over the MLP's widest activations."""
        if self.amx_products and x.numel() >= AMX_MIN_ROWS * self.in_features:
            out = self._amx_forward(x)
            return native_tanh_gelu(out) if gelu_tanh else out
        out = None
        if self.output_workspace is not None:
            out = self.output_workspace.take((*x.shape[:-1], self.out_features), x.dtype)
        return native.linear(x, self.packed_weight, self.out_features, self.bias, self.scales, self.amx_min_rows,
                             out=out, gelu_tanh=gelu_tanh)

    def _amx_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows (a prefill chunk) on a CPU with AMX: the weight unpacked for the call (no
        second copy is kept: the model's memory stays one packed weight) and oneDNN's bf16 tile
        product. Its inputs and outputs are rounded to bfloat16, as HF's bfloat16 models round
        every product's; scales and bias are applied in float32 after it."""
        weight = unpack_weight(self.packed_weight, self.out_features, torch.bfloat16, self.unpack_workspace)
        out = F.linear(x.to(torch.bfloat16), weight).float()
        if self.scales is not None:
            out *= self.scales
        if self.bias is not None:
            out += self.bias
        return out.to(x.dtype)

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
    where possible, so nothing else may keep using them. Layers loaded packed (a `starchat quantize`
    folder in panels, loader.load_model) are already PackedLinears and stay as they are."""
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
    packed_layers = [module for module in model.modules() if isinstance(module, PackedLinear)]  # with any loaded packed
    if streams_its_weights(model):  # AMX pays off from fewer rows
        for layer in packed_layers:
            layer.amx_min_rows = native_amx_min_rows(layer.packed_weight.dtype, streamed=True)
    unpacked = Workspace()  # oneDNN's products run one after another
    for layer in packed_layers:
        layer.unpack_workspace = unpacked


def _children_of_type(model: nn.Module, types: tuple[type, ...]) -> list[tuple[nn.Module, list[str]]]:
    """(parent, names of its direct children of exactly these types), holding no child itself."""
    found = []
    for parent in model.modules():
        names = [name for name, child in parent.named_children() if type(child) in types]
        if names:
            found.append((parent, names))
    return found


class Workspace:
    """One buffer a packed CPU model reuses across its layers for a tensor that is dead before the
    next layer needs it: the MLP's up projection (dead once the down projection has read it), an
    oneDNN product's unpacked weight (dead once multiplied). Layers run one after another.
    A fresh one per layer is mapped and faulted in anew where it outgrows glibc's heap threshold
    (32 MB; engine/host_memory.py): StarChat-beta's MLP at 512 rows (bfloat16, 2-core Xeon) 211
    against 221 ms with a fresh up projection each time; its unpacked weights are 75-302 MB."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of `shape` in the buffer (grown as needed), valid until the next take."""
        count = math.prod(shape)
        if self._buffer is None or self._buffer.dtype != dtype or self._buffer.numel() < count:
            self._buffer = None  # the old one goes before the new one is allocated
            self._buffer = torch.empty(count, dtype=dtype)
        return self._buffer[:count].view(shape)


def native_tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    """The tanh-approximated GELU of an oneDNN product's fresh float32 output: the native kernel's,
    in place (the decode step's arithmetic; 0.42 against PyTorch's 1.2 ms for 512 x 3,072 values on
    a 2-core Xeon), PyTorch's for anything else. The panels' products apply the same GELU in their
    stores (PackedLinear.forward)."""
    if x.dtype == torch.float32 and x.is_contiguous():
        return native.gelu_(x, True)
    return F.gelu(x, approximate="tanh")


def compute_in_float32(model: nn.Module) -> None:
    """Activations of a packed CPU model in float32 whatever its weight dtype.

    The packed products read 16-bit and int8 weights and compute in float32 anyway; this keeps
    their inputs and outputs in float32 too, so the rest of a prefill step (layer norms, GELU,
    attention) runs on float32 kernels (the native add + layer norm, native.add_layer_norm_)
    instead of PyTorch's much slower 16-bit ones, and nothing is rounded to 16 bits between
    layers (as in the fused decode path). The KV cache keeps the model dtype. Only the layer norms
    and the position table become float32; token embeddings stay as stored and are promoted when
    the positions are added. MLPs with the tanh GELU apply the native kernel's in their up
    projection's stores (`PackedLinear.forward`), as the decode step does. The MLPs' up
    projections write into one shared Workspace.
    """
    from starchat.model.gpt_bigcode import MLP

    workspace = Workspace()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.float()
        if isinstance(module, MLP) and isinstance(module.c_fc, PackedLinear):
            module.c_fc.output_workspace = workspace
            module.fused_activation = module.gelu_tanh
    model.transformer.wpe.float()
