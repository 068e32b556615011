"""Decode-sized products on a GPU: one Triton kernel that reads each weight once, int8 or 16-bit.

Decoding is bound by the bytes of weights read per token.
- int8 weights: dequantizing before a cuBLAS product (quant.Int8Linear's portable path) reads one
  byte, writes two and reads those two again, more traffic than the 16-bit weights it replaces.
  This kernel loads int8 tiles, widens them in registers, multiplies them with the activation rows
  on the tensor cores (`tl.dot`) and applies the per-channel scale and the bias once per output:

      out[m, n] = (sum_k x[m, k] * w[n, k]) * scales[n] + bias[n]

- 16-bit weights: the same kernel without scales. cuBLAS reaches 3.1-3.2 TB/s on StarChat-beta's
  thin decode shapes (c_attn, attn c_proj, lm_head) against 4.1-4.2 on the MLP's (ANCHORS), so
  tuned_linear.py times both on the GPU at load and keeps this kernel only where it is faster.

A program computes BLOCK_M rows x BLOCK_N output columns, so the weight is read once per block of
up to ROWS_PER_PASS rows. Decode batches take that path; larger row counts (prefill chunks) are
compute-bound and go to cuBLAS. `TRITON_INTERPRET=1` runs the kernel on the CPU (the tests do).
"""

from __future__ import annotations

import itertools

import torch

from starchat.model.triton_support import runs_on, triton

if triton is not None:
    import triton.language as tl

ROWS_PER_PASS = 64  # up to this many activation rows read the weight once; more go to cuBLAS
_DOT_TYPES = (torch.float16, torch.bfloat16, torch.float32)
# (BLOCK_N, BLOCK_K, num_warps) that tuning tries for 16-bit activations (bench/gpu_int8.py sweeps the same grid)
CANDIDATE_BLOCKS = list(itertools.product((16, 32, 64), (128, 256), (4, 8)))


def supports(x: torch.Tensor) -> bool:
    """Whether `linear` runs for activations x: a CUDA tensor of a float type on an Ampere or
    newer GPU with Triton installed (or any device under TRITON_INTERPRET=1), at most
    ROWS_PER_PASS rows."""
    return x.dtype in _DOT_TYPES and x.numel() // x.shape[-1] <= ROWS_PER_PASS and runs_on(x.device)


if triton is not None:
    @triton.jit
    def _weight_product(x_ptr, w_ptr, scales_ptr, bias_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_out,
                        HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, GELU_TANH: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        columns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        depth = tl.arange(0, BLOCK_K)
        row_ok, column_ok = rows < M, columns < N
        accumulator = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + depth) < K
            x = tl.load(x_ptr + rows[:, None] * stride_x + (k0 + depth)[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            # int64 offsets: a vocabulary-sized weight can pass 2^31 elements
            w = tl.load(w_ptr + columns.to(tl.int64)[None, :] * stride_w + (k0 + depth)[:, None],
                        mask=column_ok[None, :] & k_ok[:, None], other=0)
            # (BLOCK_M, BLOCK_K) @ (BLOCK_K, BLOCK_N) summed in float32
            accumulator += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
        if HAS_SCALES:
            accumulator *= tl.load(scales_ptr + columns, mask=column_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            accumulator += tl.load(bias_ptr + columns, mask=column_ok, other=0.0).to(tl.float32)[None, :]
        if GELU_TANH:
            # gelu(a) = a/2 (1 + tanh(u)) = a / (1 + exp(-2u)), u = sqrt(2/pi) (a + 0.044715 a^3).
            # The exponent is capped so that it stays finite (where the cap acts, a / (1 + e^80) and
            # the exact value are both below 1e-30). This form keeps few values live beside the tile.
            u = accumulator * (0.7978845608028654 + 0.035677408136300125 * accumulator * accumulator)
            accumulator = accumulator / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))
        tl.store(out_ptr + rows[:, None] * stride_out + columns[None, :], accumulator.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & column_ok[None, :])


def _blocks(rows: int, out_features: int, in_features: int,
            dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) when nothing was tuned. tl.dot needs tiles of at
    least 16 on each side. Narrow column blocks give the thin decode layers enough programs to
    occupy every SM; each program then streams its (BLOCK_N, K) slice of the weight, and wide
    BLOCK_K loads (pipelined by Triton over the k loop) keep enough bytes in flight per SM to
    approach the memory bandwidth. Register limits, from compiling for sm_90
    (tests/test_triton_compile.py): the widened int8 tile spills past 8,192 values a 4-warp program
    or 16 x 256 with more rows; float32 products (no tensor cores in "ieee" precision) spill at all
    but the smallest tiles."""
    if dtype == torch.float32:
        return 16, 32, 32, 4
    block_m = block_rows(rows)
    # 64 x 64 tiles (33-64 rows) spilled 32 bytes a thread with Triton 3.6 (the lent GPUs' PyTorch)
    block_n = 32 if out_features <= 8192 or block_m > 32 else 64
    block_k = 256 if in_features >= 2048 and block_m == 16 else 128
    warps = 8 if block_m > 16 or block_n * block_k > 8192 else 4
    return block_m, block_n, block_k, warps


def block_rows(rows: int) -> int:
    return max(16, triton.next_power_of_2(rows))


def linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None, bias: torch.Tensor | None = None,
           blocks: tuple[int, int, int, int] | None = None, gelu_tanh: bool = False) -> torch.Tensor:
    """x (..., K) @ (weight (N, K) [* scales (N,)[:, None]]).T + bias, in x's dtype, then the
    tanh-approximated GELU if `gelu_tanh` (applied to the float32 sums, before rounding). `weight`
    is int8 with `scales`, or of x's dtype without. Requires `supports(x)`. `blocks` (BLOCK_M,
    BLOCK_N, BLOCK_K, num_warps) overrides the built-in choice (tuning and the benchmarks)."""
    in_features = x.shape[-1]
    out_features = weight.shape[0]
    quantized = weight.dtype == torch.int8
    if (weight.shape[1] != in_features or quantized != (scales is not None) or (not quantized and weight.dtype != x.dtype)
            or (scales is not None and scales.numel() != out_features)):
        raise ValueError(f"linear: weight {tuple(weight.shape)} {weight.dtype} and scales "
                         f"{None if scales is None else tuple(scales.shape)} do not fit input {tuple(x.shape)} {x.dtype} "
                         "(int8 weights take scales; 16-bit weights have the input's dtype and none)")
    rows = x.reshape(-1, in_features).contiguous()
    weight = weight.contiguous()
    out = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block_m, block_n, block_k, warps = blocks or _blocks(rows.shape[0], out_features, in_features, x.dtype)
        grid = (triton.cdiv(out_features, block_n), triton.cdiv(rows.shape[0], block_m))
        unused = out  # pointer arguments the constexpr flags switch off
        _weight_product[grid](rows, weight, scales if quantized else unused, bias if bias is not None else unused, out,
                              rows.shape[0], out_features, in_features, rows.stride(0), weight.stride(0), out.stride(0),
                              HAS_SCALES=quantized, HAS_BIAS=bias is not None, GELU_TANH=gelu_tanh,
                              # float32 activations stay float32 (a TF32 product would round them to 10 bits)
                              PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out.reshape(*x.shape[:-1], out_features)
