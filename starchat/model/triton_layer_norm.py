"""Residual add and LayerNorm in one GPU kernel.

Every GPTBigCode block adds a sublayer's output to the residual stream and normalises the sum
for the next sublayer. As PyTorch kernels that is an add, then a LayerNorm that reads the sum
back: two launches and three passes over the rows, 160 launches per StarChat-beta token. One
program here normalises one row: it adds the two inputs in float32, stores the sum rounded to
the stream's dtype (exactly what the separate add would have stored) and normalises that rounded
sum, so the result equals the unfused pair up to the order of the float32 reductions.

`TRITON_INTERPRET=1` runs it on the CPU (tests/test_triton_kernels.py).
"""

from __future__ import annotations

import torch

from starchat.model.triton_support import launch_options, runs_on, triton, wait_for_previous_kernel

if triton is not None:
    import triton.language as tl

_TYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(hidden: torch.Tensor) -> bool:
    return hidden.dtype in _TYPES and hidden.dim() == 2 and runs_on(hidden.device)


if triton is not None:
    @triton.jit
    def _add_layer_norm(hidden_ptr, delta_ptr, weight_ptr, bias_ptr, sum_ptr, out_ptr, width, eps,
                        stride_hidden, stride_delta, stride_sum, stride_out,
                        HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
        wait_for_previous_kernel(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < width
        x = tl.load(hidden_ptr + row * stride_hidden + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_DELTA:
            x += tl.load(delta_ptr + row * stride_delta + cols, mask=ok, other=0.0).to(tl.float32)
            rounded = x.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * stride_sum + cols, rounded, mask=ok)
            x = rounded.to(tl.float32)
        mean = tl.sum(x, 0) / width
        centred = tl.where(ok, x - mean, 0.0)
        inverse_std = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / width + eps)
        weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (centred * inverse_std * weight + bias).to(out_ptr.dtype.element_ty),
                 mask=ok)


def launch_settings(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of `width`: the whole row in one program, 16 values a thread."""
    block = triton.next_power_of_2(width)
    return block, min(16, max(1, block // 512))


def add_layer_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + delta, layer_norm(hidden + delta)) for rows (T, C); delta None: (hidden, layer_norm(hidden)).
    Requires `supports(hidden)`."""
    rows, width = hidden.shape
    if hidden.stride(1) != 1 or (delta is not None and (delta.shape != hidden.shape or delta.stride(1) != 1)):
        raise ValueError("add_layer_norm: rows of equal shape with unit column stride expected")
    summed = torch.empty_like(hidden) if delta is not None else hidden
    out = torch.empty_like(hidden)
    if rows:
        block, warps = launch_settings(width)
        _add_layer_norm[(rows,)](hidden, delta if delta is not None else hidden, weight, bias, summed, out, width, eps,
                                 hidden.stride(0), (delta if delta is not None else hidden).stride(0), summed.stride(0),
                                 out.stride(0), HAS_DELTA=delta is not None, BLOCK=block, num_warps=warps,
                                 **launch_options(hidden.device))
    return summed, out
