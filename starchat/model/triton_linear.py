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
up to ROWS_PER_PASS rows. Up to MAX_ROWS rows (decode batches of up to 128 sequences) take the
kernel: the programs of one column block and its row blocks are launched side by side, so a
weight tile comes from memory once and from the L2 cache after (an int8 weight dequantized for
cuBLAS instead costs 5 bytes of traffic per weight and call). Larger row counts (prefill chunks)
are compute-bound and go to cuBLAS. `TRITON_INTERPRET=1` runs the kernel on the CPU (the tests do).
"""

from __future__ import annotations

import torch

from starchat.model.triton_support import (launch_options, prefetch_into_l2, runs_on, triton,
                                           wait_for_previous_kernel)

if triton is not None:
    import triton.language as tl

ROWS_PER_PASS = 64  # up to this many activation rows read the weight once (one row block)
MAX_ROWS = 128  # up to this many rows take the kernel; more (prefill chunks) go to cuBLAS
_DOT_TYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(x: torch.Tensor) -> bool:
    """Whether `linear` runs for activations x: a CUDA tensor of a float type on an Ampere or
    newer GPU with Triton installed (or any device under TRITON_INTERPRET=1), at most
    MAX_ROWS rows."""
    return x.dtype in _DOT_TYPES and x.numel() // x.shape[-1] <= MAX_ROWS and runs_on(x.device)


if triton is not None:
    @triton.jit
    def _weight_product(x_ptr, w_ptr, scales_ptr, bias_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_out,
                        HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, GELU_TANH: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        ROW_BLOCKS_FIRST: tl.constexpr = False, USE_PDL: tl.constexpr = False,
                        PREFETCH_LINES: tl.constexpr = 1):
        if ROW_BLOCKS_FIRST:
            # program_id(0), which varies fastest in launch order, is the row block: the row blocks
            # of one column block run side by side and share its weight tiles through the L2 cache
            # (not the default: with one row block, the other order leaves the compiler more registers)
            columns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        else:
            columns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        if USE_PDL:
            _prefetch_first_weight_tile(w_ptr, columns, N, K, stride_w, BLOCK_K, PREFETCH_LINES)
        wait_for_previous_kernel(USE_PDL)
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
        accumulator = _epilogue(accumulator, columns[None, :], column_ok[None, :], scales_ptr, bias_ptr,
                                HAS_SCALES, HAS_BIAS, GELU_TANH)
        tl.store(out_ptr + rows[:, None] * stride_out + columns[None, :], accumulator.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & column_ok[None, :])

    @triton.jit
    def _prefetch_first_weight_tile(w_ptr, columns, N, K, stride_w, BLOCK_K: tl.constexpr, LINES: tl.constexpr):
        """With dependent launch, while the kernel before still runs: the program's first
        (BLOCK_N, BLOCK_K) weight tile into L2, LINES 128-byte lines per weight row (weights do not
        depend on the previous kernel; addresses clamped into the weight)."""
        depth = tl.minimum(tl.arange(0, LINES) * (BLOCK_K // LINES), K - 1)
        weight_rows = tl.minimum(columns, N - 1).to(tl.int64)
        prefetch_into_l2(w_ptr + weight_rows[:, None] * stride_w + depth[None, :])

    @triton.jit
    def _epilogue(accumulator, columns, column_ok, scales_ptr, bias_ptr,
                  HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, GELU_TANH: tl.constexpr):
        """Per output column: the int8 scale, the bias, then the tanh GELU, on the float32 sums."""
        if HAS_SCALES:
            accumulator *= tl.load(scales_ptr + columns, mask=column_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            accumulator += tl.load(bias_ptr + columns, mask=column_ok, other=0.0).to(tl.float32)
        if GELU_TANH:
            # gelu(a) = a/2 (1 + tanh(u)) = a / (1 + exp(-2u)), u = sqrt(2/pi) (a + 0.044715 a^3).
            # The exponent is capped so that it stays finite (where the cap acts, a / (1 + e^80) and
            # the exact value are both below 1e-30). This form keeps few values live beside the tile.
            u = accumulator * (0.7978845608028654 + 0.035677408136300125 * accumulator * accumulator)
            accumulator = accumulator / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))
        return accumulator

    @triton.jit
    def _row_product(x_ptr, w_ptr, scales_ptr, bias_ptr, out_ptr, N, K, stride_x, stride_w, stride_out,
                     HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, GELU_TANH: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                     STAGES: tl.constexpr = 1, USE_PDL: tl.constexpr = False, PREFETCH_LINES: tl.constexpr = 1):
        """One activation row (program_id(1)) times BLOCK_N output columns, on the CUDA cores.

        A batch-1 decode step multiplies one row, and tl.dot's tiles need 16: the tiled kernel
        stages a padded 16-row activation tile and the weight tile through shared memory for the
        tensor cores. Here every thread multiplies its own slice of the (BLOCK_N, BLOCK_K) weight
        tile, held in registers, with the row into float32 partial sums, reduced across K once at
        the end. Which kernel is faster for a layer is measured when a model loads (tuned_linear).
        The budget it must keep: at 1 byte per int8 weight an H200's 4.2 TB/s bring each SM 16
        weights per clock, and an SM issues 128 thread instructions per clock, so 8 instructions
        per weight at most; this loop takes about 4.6 on sm_90 (tests/test_triton_compile.py).

        int8 weights are read as 32-bit words (4 weights each) and widened without conversion
        instructions: flipping each byte's sign bit gives w + 128 in 0..255, which OR-ed into the
        mantissa of 2^23 makes the float 2^23 + 128 + w; subtracting 2^23 + 128 (exact) leaves w.
        STAGES > 1 lets Triton's pipeliner copy the next int8 tiles into shared memory while this one
        is multiplied: more bytes in flight per program for layers with few programs."""
        columns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        if USE_PDL:
            _prefetch_first_weight_tile(w_ptr, columns, N, K, stride_w, BLOCK_K, PREFETCH_LINES)
        wait_for_previous_kernel(USE_PDL)
        x_row = x_ptr + tl.program_id(1).to(tl.int64) * stride_x
        column_ok = columns < N
        # int64 offsets: a vocabulary-sized weight can pass 2^31 elements
        column_offsets = columns.to(tl.int64)[:, None] * stride_w
        if HAS_SCALES:
            WORDS: tl.constexpr = BLOCK_K // 4
            words = tl.arange(0, WORDS)
            w_words = w_ptr.to(tl.pointer_type(tl.int32)) + column_offsets // 4
            accumulator = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
            for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
                word_index = k0 // 4 + words
                if EVEN_N and EVEN_K:
                    packed = tl.load(w_words + word_index[None, :])
                else:
                    packed = tl.load(w_words + word_index[None, :], mask=column_ok[:, None] & (word_index < K // 4)[None, :],
                                     other=0)
                packed = packed ^ -2139062144  # 0x80808080: every byte becomes w + 128
                for byte in tl.static_range(4):
                    if EVEN_K:
                        x = tl.load(x_row + k0 + 4 * words + byte).to(tl.float32)
                    else:
                        x = tl.load(x_row + k0 + 4 * words + byte, mask=word_index < K // 4, other=0.0).to(tl.float32)
                    widened = (((packed >> (8 * byte)) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
                    accumulator += widened * x[None, :]
        else:
            depth = tl.arange(0, BLOCK_K)
            accumulator = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                if EVEN_N and EVEN_K:
                    w = tl.load(w_ptr + column_offsets + (k0 + depth)[None, :])
                    x = tl.load(x_row + k0 + depth)
                else:
                    k_ok = (k0 + depth) < K
                    w = tl.load(w_ptr + column_offsets + (k0 + depth)[None, :], mask=column_ok[:, None] & k_ok[None, :],
                                other=0.0)
                    x = tl.load(x_row + k0 + depth, mask=k_ok, other=0.0)
                accumulator += w.to(tl.float32) * x.to(tl.float32)[None, :]
        sums = _epilogue(tl.sum(accumulator, axis=1), columns, column_ok, scales_ptr, bias_ptr,
                         HAS_SCALES, HAS_BIAS, GELU_TANH)
        tl.store(out_ptr + tl.program_id(1).to(tl.int64) * stride_out + columns, sums.to(out_ptr.dtype.element_ty),
                 mask=column_ok)


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


def row_kernel_fits(weight: torch.Tensor) -> bool:
    """Whether `_row_product` can read `weight` (contiguous): int8 weights as 32-bit words need
    rows of a multiple of 4 bytes at an aligned address."""
    return weight.dtype != torch.int8 or (weight.shape[1] % 4 == 0 and weight.data_ptr() % 4 == 0)


def block_rows(rows: int) -> int:
    """BLOCK_M for `rows` rows: tl.dot's 16 at least, ROWS_PER_PASS at most (more rows: row blocks)."""
    return min(ROWS_PER_PASS, max(16, triton.next_power_of_2(rows)))


def _launch_options(device: torch.device, weight: torch.Tensor, block_k: int) -> dict:
    """triton_support.launch_options, with, where dependent launch is on, the number of 128-byte
    lines of a BLOCK_K-deep weight row to prefetch before waiting."""
    options = launch_options(device)
    if options.get("USE_PDL"):
        options["PREFETCH_LINES"] = max(1, block_k * weight.element_size() // 128)
    return options


def linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None, bias: torch.Tensor | None = None,
           blocks: tuple[int, int, int, int] | None = None, gelu_tanh: bool = False) -> torch.Tensor:
    """x (..., K) @ (weight (N, K) [* scales (N,)[:, None]]).T + bias, in x's dtype, then the
    tanh-approximated GELU if `gelu_tanh` (applied to the float32 sums, before rounding). `weight`
    is int8 with `scales`, or of x's dtype without. Requires `supports(x)`. `blocks` (BLOCK_M,
    BLOCK_N, BLOCK_K, num_warps) overrides the built-in choice (tuning and the benchmarks);
    BLOCK_M = 1 picks the row kernel (`_row_product`: each row on its own, on the CUDA cores),
    which suits a single row; its blocks may add a fifth number, the int8 loop's pipeline stages."""
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
    if blocks is not None and blocks[0] == 1 and row_kernel_fits(weight):
        if rows.shape[0]:
            _, block_n, block_k, warps, *stages = blocks
            grid = (triton.cdiv(out_features, block_n), rows.shape[0])
            unused = out
            _row_product[grid](rows, weight, scales if quantized else unused, bias if bias is not None else unused, out,
                               out_features, in_features, rows.stride(0), weight.stride(0), out.stride(0),
                               HAS_SCALES=quantized, HAS_BIAS=bias is not None, GELU_TANH=gelu_tanh,
                               BLOCK_N=block_n, BLOCK_K=block_k, EVEN_N=out_features % block_n == 0,
                               EVEN_K=in_features % block_k == 0, STAGES=stages[0] if stages else 1, num_warps=warps,
                               **_launch_options(x.device, weight, block_k))
        return out.reshape(*x.shape[:-1], out_features)
    if rows.shape[0]:
        block_m, block_n, block_k, warps = (blocks if blocks is not None and blocks[0] != 1
                                            else _blocks(rows.shape[0], out_features, in_features, x.dtype))
        row_blocks, column_blocks = triton.cdiv(rows.shape[0], block_m), triton.cdiv(out_features, block_n)
        grid = (row_blocks, column_blocks) if row_blocks > 1 else (column_blocks, row_blocks)
        unused = out  # pointer arguments the constexpr flags switch off
        _weight_product[grid](rows, weight, scales if quantized else unused, bias if bias is not None else unused, out,
                              rows.shape[0], out_features, in_features, rows.stride(0), weight.stride(0), out.stride(0),
                              HAS_SCALES=quantized, HAS_BIAS=bias is not None, GELU_TANH=gelu_tanh,
                              # float32 activations stay float32 (a TF32 product would round them to 10 bits)
                              PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ROW_BLOCKS_FIRST=row_blocks > 1,
                              num_warps=warps, **_launch_options(x.device, weight, block_k))
    return out.reshape(*x.shape[:-1], out_features)
