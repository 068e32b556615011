"""starchat's native CPU kernels (starchat/model/native): products, decode and prompt attention against
float64 PyTorch references, conversions bit-exact against PyTorch's, the build cache and the
fallback when no compiler is available."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch

from starchat.model import native
from starchat.model.native import build
from starchat.model.quant import quantize_in_slices, quantize_per_channel

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the kernels fall back to PyTorch")

ACTIVATION_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # output rounding


def _stored(weight: torch.Tensor, dtype: torch.dtype):
    """(weight as the kernel reads it, its int8 scales or None, the float64 matrix it stands for)."""
    if dtype == torch.int8:
        quantized, scales = quantize_per_channel(weight)
        return quantized, scales, quantized.double() * scales.double()[:, None]
    stored = weight.to(dtype)
    return stored, None, stored.double()


def _product(x, weight, bias=None, scales=None):
    return native.linear(x, native.pack_weight(weight), weight.shape[0], bias, scales)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("activation_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_matches_float64_reference(weight_dtype, activation_dtype):
    # int8 weights on a CPU with AVX512-VNNI: rows quantized to 15 bits (int8_rows.h), which the
    # reference then takes too (the same 1e-5 pins the quantization, not only its accuracy)
    generator = torch.Generator().manual_seed(1)
    # 1-6 rows: one tile; 7+: panels widened once; 150: more than one block of rows (ROW_BLOCK 144)
    for rows in (1, 2, 3, 4, 5, 6, 8, 17, 33, 150):
        for out_features, in_features in ((96, 64), (37, 771)):  # an odd K and N exercise every tail
            x = torch.randn(2, rows, in_features, generator=generator).to(activation_dtype)  # leading dims flatten
            weight, scales, dense = _stored(torch.randn(out_features, in_features, generator=generator), weight_dtype)
            bias = torch.randn(out_features, generator=generator)
            out = _product(x, weight, bias, scales)
            rows_in = x.double()
            if weight_dtype == torch.int8 and native.int8_rows_quantized():  # 2 x rows > 1: 15-bit rows (VNNI)
                rows_in = _quantized_rows(x.float().reshape(-1, in_features)).reshape(x.shape)
            expected = rows_in @ dense.T + bias.double()
            assert out.dtype == activation_dtype and out.shape == (2, rows, out_features)
            error = (out.double() - expected).abs().max() / expected.abs().max()
            assert error < ACTIVATION_TOLERANCE[activation_dtype], (rows, out_features, in_features, float(error))


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_one_row_product_matches_float64_reference(weight_dtype):
    # A single row (decoding one sequence) takes its own path: accumulator chains over k in steps
    # of four, then a tail; K from below one step to a remainder of three.
    generator = torch.Generator().manual_seed(2)
    for out_features, in_features in ((16, 1), (16, 3), (33, 4), (48, 771), (20, 3072)):
        x = torch.randn(1, in_features, generator=generator)
        weight, scales, dense = _stored(torch.randn(out_features, in_features, generator=generator), weight_dtype)
        out = _product(x, weight, None, scales)
        expected = x.double() @ dense.T
        error = (out.double() - expected).abs().max() / expected.abs().max()
        assert error < ACTIVATION_TOLERANCE[torch.float32], (out_features, in_features, float(error))


def test_one_row_bfloat16_product_equals_the_float32_one_bit_for_bit():
    # bfloat16 panels are widened in even and odd columns (no shuffles) and put back in column
    # order at the end: the same sums in the same order as over the same weights in float32.
    generator = torch.Generator().manual_seed(5)
    for out_features, in_features in ((16, 3), (37, 771), (64, 3072)):
        x = torch.randn(1, in_features, generator=generator)
        weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
        bias = torch.randn(out_features, generator=generator)
        assert torch.equal(_product(x, weight, bias), _product(x, weight.float(), bias)), (out_features, in_features)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.int8])
def test_amx_products_from_the_panels_match_float64_of_bfloat16_inputs(weight_dtype):
    # On AMX tiles (amx.c): panels turned into B tiles as they stream by, activations rounded to
    # bfloat16, float32 sums; K not a multiple of 32 and a partial last panel exercise the padding,
    # 100 rows two passes of four 16-row tiles (B tiles kept across passes, panels in groups of
    # four, a partial group); K of 8,200 (64-row passes over 1 MiB) goes a few steps of K at a time
    # over all passes with partial sums, the last block of K short, panels in groups of 16 (300
    # outputs: a full group and a partial one ending in a partial panel). Up to 32 rows (8, 17) take panels two at a
    # time, an odd last panel alone, and so do 40 and 64 rows of bfloat16 in two passes (the
    # second of one row block at 40); 20 outputs make a pair whose second panel is partial. Fewer
    # rows than asked keep the native tiles' bits. int8 weights take bfloat16 tiles only where
    # their rows are too many for AMX-INT8's (K of 8,200 from 64 rows), if the CPU has those.
    if not native.amx_init():
        pytest.skip("no AMX tiles on this CPU (or not granted by the kernel)")
    generator = torch.Generator().manual_seed(7)
    for out_features, in_features in ((3072, 768), (37, 771), (48, 40), (80, 8200), (300, 8200), (20, 100)):
        weight, scales, dense = _stored(torch.randn(out_features, in_features, generator=generator), weight_dtype)
        packed, bias = native.pack_weight(weight), torch.randn(out_features, generator=generator)
        for rows in (7, 8, 17, 40, 64, 100):
            if weight_dtype == torch.int8 and 8 <= rows <= native.amx_int8_max_rows(in_features):
                continue  # AMX-INT8 tiles: the next test
            x = torch.randn(rows, in_features, generator=generator)
            out = native.linear(x, packed, out_features, bias, scales, amx_min_rows=8)
            if rows < 8:
                assert torch.equal(out, native.linear(x, packed, out_features, bias, scales))
                continue
            expected = x.to(torch.bfloat16).double() @ dense.T + bias.double()
            error = (out.double() - expected).abs().max() / expected.abs().max()
            assert error < 1e-5, (out_features, in_features, rows, float(error))
            unbiased = native.linear(x, packed, out_features, None, scales, amx_min_rows=8)
            error = (unbiased.double() - (expected - bias.double())).abs().max() / expected.abs().max()
            assert error < 1e-5, (out_features, in_features, rows, "no bias", float(error))
            # bfloat16 in and out: the same sums (bias and scales included), rounded once on the way out
            rounded_in = x.to(torch.bfloat16)
            assert torch.equal(native.linear(rounded_in, packed, out_features, bias, scales, amx_min_rows=8),
                               native.linear(rounded_in.float(), packed, out_features, bias, scales, amx_min_rows=8).to(torch.bfloat16))


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.int8])
def test_amx_wide_products_of_many_rows_take_steps_of_k_outermost_with_the_same_bits(weight_dtype):
    # 520 rows of K 4,100 (4.4 MB of bfloat16 rows, over ALL_ROWS_FROM) against 2,100 outputs (132
    # panels: 16-panel groups for both threads, the last group one partial panel) go steps of K
    # outermost; 260 rows at a time stay under it and go pass by pass in 2 x 2 blocks. Each output
    # sums its products in the same order either way: the same bits, and float64's result.
    if not native.amx_init():
        pytest.skip("no AMX tiles on this CPU (or not granted by the kernel)")
    generator = torch.Generator().manual_seed(23)
    weight, scales, dense = _stored(torch.randn(2100, 4100, generator=generator), weight_dtype)
    packed, bias = native.pack_weight(weight), torch.randn(2100, generator=generator)
    x = torch.randn(520, 4100, generator=generator)
    out = native.linear(x, packed, 2100, bias, scales, amx_min_rows=8)
    halves = torch.cat([native.linear(half, packed, 2100, bias, scales, amx_min_rows=8) for half in x.split(260)])
    assert torch.equal(out, halves)
    expected = x.to(torch.bfloat16).double() @ dense.T + bias.double()
    assert ((out.double() - expected).abs().max() / expected.abs().max()) < 1e-5


_AMX_OUTPUTS_SCRIPT = """
import sys, torch
from starchat.model import native
assert native.amx_init(), "no AMX tiles in the child process"
products, (query, key, value) = torch.load(sys.argv[1])
results = [native.linear(x, native.pack_weight(weight), weight.shape[0], bias, scales, amx_min_rows=8)
           for x, weight, bias, scales in products]
attention = torch.zeros(query.shape)
assert native.prompt_attention(query, attention, [(0, query.shape[0], 0, key, value, None)], 2, 2, 0.125, False)
torch.save(results + [attention], sys.argv[2])
"""


def test_amx_kernels_do_not_depend_on_the_compilers_inlining(tmp_path):
    """The tile configuration must reach the CPU whole however the compiler inlines: built on the
    stack, GCC 12 dropped its stores wherever configure_tiles was not inlined and the tile load
    faulted (a crash, seen when a change to amx.c tipped the inliner). A build without inlining
    (-fno-inline), in a child process so that a crash fails this test alone, gives the default
    build's bits for AMX products of each weight kind (bfloat16 tiles, AMX-INT8, float16's split)
    and prompt attention."""
    if not native.amx_init():
        pytest.skip("no AMX tiles on this CPU (or not granted by the kernel)")
    generator = torch.Generator().manual_seed(17)
    products = []
    for weight_dtype in (torch.bfloat16, torch.int8, torch.float16):
        weight, scales, _ = _stored(torch.randn(48, 100, generator=generator), weight_dtype)
        for rows in (17, 100):
            products.append((torch.randn(rows, 100, generator=generator), weight, torch.randn(48, generator=generator), scales))
    qkv = torch.randn(40, 3 * 64, generator=generator)
    torch.save((products, [part.contiguous() for part in qkv.split((64, 64, 64), dim=-1)]), tmp_path / "inputs.pt")
    for name, flags in (("default", None), ("no-inline", "-fno-inline")):  # the default: this process's build
        environment = dict(os.environ) if flags is None else \
            {**os.environ, "STARCHAT_CACHE_DIR": str(tmp_path / name), "STARCHAT_NATIVE_CFLAGS": flags}
        child = subprocess.run([sys.executable, "-c", _AMX_OUTPUTS_SCRIPT, str(tmp_path / "inputs.pt"), str(tmp_path / f"{name}.pt")],
                               env=environment, capture_output=True, text=True)
        assert child.returncode == 0, f"the {name} build failed (exit {child.returncode}): {child.stderr[-2000:]}"
    for got, want in zip(torch.load(tmp_path / "no-inline.pt"), torch.load(tmp_path / "default.pt"), strict=True):
        assert torch.equal(got, want)


def test_int8_rows_longer_than_vnni_sums_hold_take_the_float32_tiles():
    # Past K 65,536 a VNNI lane's int32 sum of (w + 128) x part could overflow: such products
    # multiply float32 rows (exact activations) wherever VNNI would have quantized them.
    generator = torch.Generator().manual_seed(13)
    weight, scales, dense = _stored(torch.randn(16, 65_600, generator=generator), torch.int8)
    x = torch.randn(3, 65_600, generator=generator)
    out = _product(x, weight, None, scales)
    expected = x.double() @ dense.T
    assert ((out.double() - expected).abs().max() / expected.abs().max()) < 1e-5


def _quantized_rows(x: torch.Tensor, float32: bool = False) -> torch.Tensor:
    """x (float32) as the int8-by-int8 products see it (AMX-INT8, VNNI), in float64: each row
    scaled to +-16,256 (127 x 128) by its largest magnitude, rounded to integers (half to even),
    scaled back; with float32, scaled back in float32 as the kernels do (their integer sums exact)."""
    largest = x.abs().amax(dim=1, keepdim=True)
    levels = torch.tensor(16256.0)
    inverse = torch.where(largest > 0, levels / largest, torch.zeros_like(largest))  # float32, as the kernel
    if float32:
        return torch.round(x * inverse) * (largest / levels)
    return torch.round(x * inverse).double() * (largest / levels).double()


def test_amx_int8_products_quantize_each_row_to_15_bits():
    # int8 weights on AMX-INT8 tiles (amx.c): each activation row as s (128 hi + lo), two int8
    # parts, integer sums of each part, float32 from there on. Pinned against that quantization
    # in float64 (1e-5: only the float32 finish differs), and shown finer than rounding the
    # activations to bfloat16 (the bfloat16 tiles' way). K not a multiple of 64 (masked loads of
    # the last panel's rows), an odd last panel (alone), a partial one, 1-7 row blocks (B tiles
    # built in the first and kept); outputs in bfloat16 and float16 rounded once from the same sums.
    if not native.amx_init() or native.amx_int8_max_rows(64) == 0:
        pytest.skip("no AMX-INT8 tiles on this CPU (or not granted by the kernel)")
    generator = torch.Generator().manual_seed(11)
    for out_features, in_features in ((3072, 768), (37, 771), (48, 40), (20, 100), (33, 129)):
        weight, scales, dense = _stored(torch.randn(out_features, in_features, generator=generator), torch.int8)
        packed, bias = native.pack_weight(weight), torch.randn(out_features, generator=generator)
        for rows in (4, 8, 17, 40, 64, 100):
            assert rows <= native.amx_int8_max_rows(in_features)
            x = torch.randn(rows, in_features, generator=generator) * 3
            out = native.linear(x, packed, out_features, bias, scales, amx_min_rows=4)
            expected = _quantized_rows(x) @ dense.T + bias.double()
            error = (out.double() - expected).abs().max() / expected.abs().max()
            assert error < 1e-5, (out_features, in_features, rows, float(error))
            exact = x.double() @ dense.T + bias.double()
            bf16_error = (x.to(torch.bfloat16).double() @ dense.T + bias.double() - exact).abs().max()
            assert (out.double() - exact).abs().max() < bf16_error / 4, (out_features, in_features, rows)
            for dtype in (torch.bfloat16, torch.float16):
                assert torch.equal(native.linear(x.to(dtype), packed, out_features, bias, scales, amx_min_rows=4),
                                   native.linear(x.to(dtype).float(), packed, out_features, bias, scales, amx_min_rows=4).to(dtype))
    # a row with an infinity or a NaN is NaN throughout, the others untouched; a zero row is the bias
    weight, scales, _ = _stored(torch.randn(37, 771, generator=generator), torch.int8)
    packed, bias = native.pack_weight(weight), torch.randn(37, generator=generator)
    x = torch.randn(8, 771, generator=generator)
    clean = native.linear(x, packed, 37, bias, scales, amx_min_rows=4)
    x[2, 770], x[5, 3], x[6] = float("nan"), float("-inf"), 0.0  # 770: past the last 16 (scalar tail)
    out = native.linear(x, packed, 37, bias, scales, amx_min_rows=4)
    assert out[[2, 5]].isnan().all() and torch.equal(out[6], bias)
    assert torch.equal(out[[0, 1, 3, 4, 7]], clean[[0, 1, 3, 4, 7]])


def test_amx_float16_products_keep_the_weights_exact_and_16_bits_of_the_activations():
    # float16 weights on AMX tiles: each weight as two bfloat16 halves that sum to it exactly, each
    # activation as two keeping 16 bits, three tile products. Against float64 of the unrounded
    # inputs the error stays near 2^-16 of the largest output; rounding either side to bfloat16
    # (or dropping a low half) costs about 2^-9, which the bound excludes. Subnormal float16
    # weights and K / N tails included; fewer rows than asked keep the native tiles' bits.
    if not native.amx_init():
        pytest.skip("no AMX tiles on this CPU (or not granted by the kernel)")
    generator = torch.Generator().manual_seed(8)
    # K of 4,200: 64-row passes of both halves over 1 MiB, taken two steps of K at a time over all
    # passes, panels in groups of 16 (300 outputs: two groups, the last panel partial); of 16,500
    # the same with more steps of K
    for out_features, in_features in ((3072, 768), (37, 771), (48, 40), (80, 4200), (300, 4200), (48, 16500)):
        weight = torch.randn(out_features, in_features, generator=generator)
        weight[:, ::7] *= 1e-6  # float16 subnormals (below 6.1e-5): still exact as two halves
        weight = weight.half()
        packed, bias = native.pack_weight(weight), torch.randn(out_features, generator=generator)
        for rows in (11, 12, 17, 64, 100):
            x = torch.randn(rows, in_features, generator=generator)
            out = native.linear(x, packed, out_features, bias, amx_min_rows=12)
            if rows < 12:
                assert torch.equal(out, native.linear(x, packed, out_features, bias))
                continue
            expected = x.double() @ weight.double().T + bias.double()
            error = (out.double() - expected).abs().max() / expected.abs().max()
            rounded = x.to(torch.bfloat16).double() @ weight.double().T + bias.double()
            rounding_error = (rounded - expected).abs().max() / expected.abs().max()
            assert error < 2e-5 < rounding_error / 20, (out_features, in_features, rows, float(error), float(rounding_error))


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.int8])
def test_unpacked_bf16_weight_is_the_weight_exactly(weight_dtype):
    # Register transposes of 16 x 16 blocks, scalar tails (K not a multiple of 16, a partial last
    # panel): every element back where it was, int8 values exact in bfloat16.
    generator = torch.Generator().manual_seed(6)
    for out_features, in_features in ((16, 16), (48, 771), (37, 64), (5, 3), (2304, 768)):
        weight, _, _ = _stored(torch.randn(out_features, in_features, generator=generator), weight_dtype)
        unpacked = native.unpack_bf16(native.pack_weight(weight), out_features)
        assert unpacked.dtype == torch.bfloat16 and torch.equal(unpacked, weight.to(torch.bfloat16)), (out_features, in_features)
    with pytest.raises(ValueError, match="bfloat16 or int8"):
        native.unpack_bf16(native.pack_weight(torch.randn(16, 8)), 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_rounding_is_bit_exact(dtype):
    # y = x * s on a diagonal weight: one float32 product per output, rounded to 16 bits by the
    # kernel; PyTorch rounds the same float32 values. Covers subnormals and overflow to infinity.
    values = torch.cat([torch.randn(4000) * 10 ** torch.randint(-9, 6, (4000,)).float(),
                        torch.tensor([0.0, -0.0, 65504.0, -65504.0, 6e-8, 3e-8, 1e-40])])
    values = values[torch.isfinite(values.to(dtype))]  # finite inputs (inf * 0 is NaN in any product)
    values = values[: values.numel() // 8 * 8].reshape(-1, 8)
    for row in values:
        scale = torch.rand(8) + 0.5
        out = _product(row[None].to(dtype), torch.diag(scale))
        expected = (row.to(dtype).float() * scale).to(dtype)
        # Same 16-bit value (a dot product's zero is +0 where the lone product was -0: equal values)
        assert torch.equal(out[0].float(), expected.float()), (row, scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_full_panels_round_their_outputs_bit_for_bit(dtype):
    # Full 16-column panels leave the sums eight values a vector (store_tile_rows): the same 16-bit
    # values as PyTorch's rounding of the same float32 ones (subnormals, overflow to infinity in
    # float16), through the weight's scales (int8) and the bias; a row with a NaN is NaN.
    # Diagonal weights: one product per output, exact.
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(5 * 16, generator=generator) * 10 ** torch.randint(-9, 4, (5 * 16,), generator=generator).float()
    values[:6] = torch.tensor([65000.0, -65000.0, 1e-40, -0.0, 3e-8, 6e-8])
    values[64:] = float("nan")
    x = values.reshape(5, 16).to(dtype)  # five rows: the many-row tiles, not the one-row kernel
    scale, bias = torch.rand(16, generator=generator) + 0.5, torch.randn(16, generator=generator)
    scale[:2] = 1.4  # 65,000 x 1.4 is past float16's largest
    for weight, scales in ((torch.diag(scale), None), (torch.eye(16, dtype=torch.int8), scale)):
        for with_bias in (False, True):
            out = native.linear(x, native.pack_weight(weight), 16, bias if with_bias else None, scales)
            rows = x.float()
            if scales is not None and native.int8_rows_quantized():
                rows = _quantized_rows(rows, float32=True)  # (q s) x scale + bias, each rounded to float32
            expected = (rows * scale + (bias if with_bias else 0.0)).to(dtype)
            assert out[4].isnan().all() and not out[:4].isnan().any()
            assert torch.equal(out[:4].float(), expected[:4].float()), (weight.dtype, with_bias)  # -0 equals +0
            if dtype == torch.float16:
                assert out[0, :2].isinf().all()


def test_nan_stays_nan():
    x = torch.tensor([[float("nan"), 1.0], [2.0, 1.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    for dtype in (torch.float16, torch.bfloat16):
        out = _product(x.to(dtype), weight)
        assert torch.equal(torch.isnan(out), torch.isnan(x @ weight.T))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="int8 weights need scales"):
        _product(torch.randn(1, 8), torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="pack it with pack_weight"):
        native.linear(torch.randn(1, 8), torch.randn(4, 8), 4)  # not packed
    with pytest.raises(ValueError, match="pack it with pack_weight"):
        native.linear(torch.randn(1, 8), native.pack_weight(torch.randn(4, 8)), 17)  # more outputs than panels hold
    with pytest.raises(ValueError, match="bias"):
        _product(torch.randn(1, 8), torch.randn(4, 8), torch.randn(4).half())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_packed_weight_rows_read_back(dtype):
    """Embedding lookups in a packed (tied) table return the original rows, padding excluded."""
    weight = torch.randn(37, 12).to(dtype) if dtype != torch.int8 else torch.randint(-127, 128, (37, 12), dtype=dtype)
    packed = native.pack_weight(weight)
    assert packed.shape == (3, 12, native.PANEL) and packed.dtype == dtype
    rows = torch.tensor([0, 15, 16, 36, 5, 5])
    assert torch.equal(native.unpack_rows(packed, rows), weight[rows])
    assert not packed[2, :, 5:].any()  # the padded columns are zero
    whole = weight[:32].clone()
    in_place = native.pack_weight_in_place(whole)
    assert in_place.data_ptr() == whole.data_ptr() and torch.equal(in_place, native.pack_weight(weight[:32]))
    with pytest.raises(ValueError, match="multiple of 16"):
        native.pack_weight_in_place(weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_matches_reference(dtype, threads):
    generator = torch.Generator().manual_seed(2)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch, heads, kv_heads, head_dim, max_len in ((1, 12, 1, 64, 70), (3, 12, 1, 64, 33), (4, 8, 8, 16, 20),
                                                          (2, 8, 2, 32, 5), (1, 5, 1, 12, 9)):
            cache = torch.randn(2, 200, kv_heads * head_dim, generator=generator).to(dtype)
            query = torch.randn(batch, heads * head_dim, generator=generator).to(dtype)
            slots = torch.randint(0, 200, (batch, max_len), generator=generator)
            lengths = torch.randint(1, max_len + 1, (batch,), generator=generator)
            lengths[0] = max_len
            mask = torch.zeros(batch, max_len).masked_fill_(torch.arange(max_len)[None] >= lengths[:, None], float("-inf"))
            scale = 1 / math.sqrt(head_dim)
            out = native.decode_attention(query, cache, slots, mask[:, None, None, :], heads, kv_heads, scale)

            keys = cache[0][slots].double().view(batch, max_len, kv_heads, head_dim)
            values = cache[1][slots].double().view(batch, max_len, kv_heads, head_dim)
            grouped = query.double().view(batch, kv_heads, heads // kv_heads, head_dim)
            scores = torch.einsum("bkgd,blkd->bkgl", grouped, keys) * scale + mask.double()[:, None, None, :]
            expected = torch.einsum("bkgl,blkd->bkgd", torch.softmax(scores, -1), values).reshape(batch, -1)
            assert out.dtype == dtype
            assert (out.double() - expected).abs().max() < ACTIVATION_TOLERANCE[dtype] * 10
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_over_a_16_bit_cache_on_amx_tiles(cache_dtype):
    # Where AMX tiles are granted, a 16-bit cache's attention (4+ query heads per KV head) runs on
    # them, scores and sums float32. bfloat16: queries and softmax weights rounded to bfloat16,
    # within bfloat16's rounding of float64. float16: keys and values as two exact bfloat16
    # halves, queries and weights as two halves keeping 16 bits, within 5e-5 (bfloat16 rounding
    # fails that). The vector code (AMX taken back) stays within float32's. Cases: 12 heads (one
    # tile of 16), 20 (16 + 4), 48 at head_dim 128 (StarChat-beta), two KV heads, lengths off the
    # 16- and 32-key steps, a masked hole, a fully masked row.
    if not native.amx_init():
        pytest.skip("no AMX tiles on this CPU (or not granted by the kernel)")
    generator = torch.Generator().manual_seed(9)
    try:
        for batch, heads, kv_heads, head_dim, max_len in ((3, 12, 1, 64, 70), (3, 20, 1, 32, 100), (2, 48, 1, 128, 33),
                                                          (2, 8, 2, 64, 47), (4, 16, 1, 64, 16)):
            cache = torch.randn(2, 300, kv_heads * head_dim, generator=generator).to(cache_dtype)
            query = torch.randn(batch, heads * head_dim, generator=generator)  # float32, as the engine's
            slots = torch.randint(0, 300, (batch, max_len), generator=generator)
            lengths = torch.randint(1, max_len + 1, (batch,), generator=generator)
            lengths[0] = max_len
            mask = torch.zeros(batch, max_len).masked_fill_(torch.arange(max_len)[None] >= lengths[:, None], float("-inf"))
            mask[1, min(2, max_len - 1)] = float("-inf")
            mask[-1] = float("-inf")  # nothing to attend to: zeros
            scale = 1 / math.sqrt(head_dim)
            native.amx_init()
            tiles = native.decode_attention(query, cache, slots, mask[:, None, None, :], heads, kv_heads, scale)
            native.amx_disable()
            vectors = native.decode_attention(query, cache, slots, mask[:, None, None, :], heads, kv_heads, scale)

            keys = cache[0][slots].double().view(batch, max_len, kv_heads, head_dim)
            values = cache[1][slots].double().view(batch, max_len, kv_heads, head_dim)
            grouped = query.double().view(batch, kv_heads, heads // kv_heads, head_dim)
            scores = torch.einsum("bkgd,blkd->bkgl", grouped, keys) * scale + mask.double()[:, None, None, :]
            expected = torch.einsum("bkgl,blkd->bkgd", torch.softmax(scores[:-1], -1), values[:-1]).reshape(batch - 1, -1)
            tiles_error = (tiles[:-1].double() - expected).abs().max().item()
            vectors_error = (vectors[:-1].double() - expected).abs().max().item()
            assert vectors_error < 1e-5, (heads, head_dim, max_len, vectors_error)
            assert not torch.equal(tiles, vectors)  # the tiles ran
            bound = 1.5e-2 if cache_dtype == torch.bfloat16 else 5e-5
            assert tiles_error < bound, (heads, head_dim, max_len, tiles_error)
            assert torch.equal(tiles[-1], torch.zeros(heads * head_dim))
    finally:
        native.amx_init()


def _causal_reference(query, keys, values, first_row, length, context_len, heads, kv_heads, scale):
    """float64 causal attention of rows first_row .. + length (each sees context_len + its index + 1 keys)."""
    head_dim = query.shape[1] // heads
    q = query[first_row:first_row + length].double().view(length, kv_heads, heads // kv_heads, head_dim)
    k = keys.double().view(-1, kv_heads, head_dim)
    v = values.double().view(-1, kv_heads, head_dim)
    scores = torch.einsum("nkgd,lkd->kgnl", q, k) * scale
    hidden = torch.arange(k.shape[0])[None, :] > (context_len + torch.arange(length))[:, None]
    weights = torch.softmax(scores.masked_fill(hidden, float("-inf")), -1)
    return torch.einsum("kgnl,lkd->nkgd", weights, v).reshape(length, heads * head_dim)


PROMPT_ATTENTION_CASES = [  # heads, kv_heads, head_dim, chunks as (length, context_len)
    (12, 1, 64, [(70, 0)]),  # tiny_starcoder's heads: a block of 16 rows spans two tokens
    (12, 1, 64, [(33, 17), (5, 0), (1, 40), (64, 0)]),  # several chunks in one call, cached context
    (48, 1, 128, [(40, 5), (17, 0)]),  # StarChat-beta's heads
    (8, 2, 64, [(20, 0), (3, 29)]),  # two KV heads
    (20, 1, 32, [(100, 3)]),
    (4, 4, 32, [(37, 0), (9, 20)]),  # multi-head: a block is 16 tokens of one head
    # past 1,536 keys the keys go 1,024 at a time (KEY_BLOCK, a last block of up to 1,536) with an
    # online softmax: two blocks, three (multi-head), a fresh long prompt whose first rows see one
    (12, 1, 64, [(40, 2100)]),
    (4, 4, 32, [(30, 2550)]),
    (12, 1, 64, [(1700, 0)]),
]


@pytest.mark.parametrize("split", [False, True])
def test_prompt_attention_on_amx_tiles_matches_float64(split):
    # All prefill chunks of a step in one call (prompt_attention.c): fresh chunks read float32 key
    # and value rows of the fused projection, chunks with cached context a 16-bit cache through
    # slots. bfloat16 (split False): within bfloat16's rounding of float64, and within 5e-3 of
    # float64 over the same inputs rounded to bfloat16 (the weights are rounded too); split: 16
    # bits of every value, within 5e-5 of float64 of the unrounded inputs, which the bfloat16
    # mode fails. Rows of the step outside the chunks are left alone.
    if not native.amx_init():
        pytest.skip("no AMX tiles on this CPU (or not granted by the kernel)")
    generator = torch.Generator().manual_seed(11)
    cache_dtype = torch.float16 if split else torch.bfloat16
    for heads, kv_heads, head_dim, lengths in PROMPT_ATTENTION_CASES:
        kv_dim = kv_heads * head_dim
        decodes = 3  # rows before the chunks, as decode rows precede them in a step
        total = decodes + sum(length for length, _ in lengths)
        qkv = torch.randn(total, (heads + 2 * kv_heads) * head_dim, generator=generator)
        query, key, value = qkv.split((heads * head_dim, kv_dim, kv_dim), dim=-1)
        cache_rows = max(400, max(length + context_len for length, context_len in lengths))
        cache = torch.randn(2, cache_rows, kv_dim, generator=generator).to(cache_dtype)
        chunks, expected, rounded, row = [], [], [], decodes
        for length, context_len in lengths:
            if context_len:
                slots = torch.randperm(cache_rows, generator=generator)[:context_len + length]
                cache[0][slots[context_len:]] = key[row:row + length].to(cache_dtype)
                cache[1][slots[context_len:]] = value[row:row + length].to(cache_dtype)
                chunks.append((row, length, context_len, cache[0], cache[1], slots))
                keys, values = cache[0][slots], cache[1][slots]
            else:
                chunks.append((row, length, 0, key[row:row + length], value[row:row + length], None))
                keys, values = key[row:row + length], value[row:row + length]
            scale = 1 / math.sqrt(head_dim)
            expected.append(_causal_reference(query, keys, values, row, length, context_len, heads, kv_heads, scale))
            bf16 = (query.bfloat16(), keys.bfloat16(), values.bfloat16())
            rounded.append(_causal_reference(*bf16, row, length, context_len, heads, kv_heads, scale))
            row += length
        out = torch.full((total, heads * head_dim), 7.0)
        assert native.prompt_attention(query, out, chunks, heads, kv_heads, 1 / math.sqrt(head_dim), split)
        assert torch.equal(out[:decodes], torch.full((decodes, heads * head_dim), 7.0))
        error = (out[decodes:].double() - torch.cat(expected)).abs().max().item()
        if split:
            assert error < 5e-5, (heads, head_dim, lengths, error)
        else:
            assert 5e-5 < error < 1.5e-2, (heads, head_dim, lengths, error)
            rounded_error = (out[decodes:].double() - torch.cat(rounded)).abs().max().item()
            assert rounded_error < 5e-3, (heads, head_dim, lengths, rounded_error)


def test_prompt_attention_is_causal_and_declines_what_the_tiles_do_not_take():
    if not native.amx_init():
        pytest.skip("no AMX tiles on this CPU (or not granted by the kernel)")
    generator = torch.Generator().manual_seed(12)
    heads, head_dim, length = 12, 64, 40
    query, key, value = torch.randn(3, length, heads * head_dim, generator=generator)
    key, value = key[:, :head_dim].contiguous(), value[:, :head_dim].contiguous()
    key[25, 3] = float("nan")  # seen by tokens 25 .. 39 only
    out = torch.zeros(length, heads * head_dim)
    assert native.prompt_attention(query, out, [(0, length, 0, key, value, None)], heads, 1, 0.125, False)
    assert torch.isfinite(out[:25]).all() and torch.isnan(out[25:]).all()
    # a head size off the tiles' 32 values, or AMX taken back: nothing written, the caller uses SDPA
    odd = torch.zeros(length, 12 * 48)
    assert not native.prompt_attention(torch.randn(length, 12 * 48), odd, [(0, length, 0, key[:, :48], value[:, :48], None)],
                                       12, 1, 0.125, False)
    native.amx_disable()
    try:
        untouched = torch.zeros(length, heads * head_dim)
        assert not native.prompt_attention(query, untouched, [(0, length, 0, key, value, None)], heads, 1, 0.125, False)
        assert not untouched.any()
    finally:
        native.amx_init()
    with pytest.raises(ValueError, match="outside"):
        native.prompt_attention(query, out, [(10, length, 0, key, value, None)], heads, 1, 0.125, False)
    with pytest.raises(ValueError, match="slots"):
        native.prompt_attention(query, out, [(0, 4, 2, key, value, torch.arange(5))], heads, 1, 0.125, False)


def _skip_unless_attention_path(cache_dtype, tiles: bool) -> None:
    """Skips a case whose decode attention path (AMX tiles or the vector code) cannot run here."""
    if tiles and not native.amx_init():
        pytest.skip("no AMX tiles on this CPU (or not granted by the kernel)")
    if tiles and cache_dtype == torch.float32:
        pytest.skip("a float32 cache takes the vector code")


def _every_attention_path(test):
    """Parametrize `test` over every cache dtype, the tiles and the vector code, 1-3 threads."""
    test = pytest.mark.parametrize("threads", [1, 2, 3])(test)
    test = pytest.mark.parametrize("tiles", [True, False])(test)
    return pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16])(test)


@contextlib.contextmanager
def _attention_path(threads: int, tiles: bool):
    """Decode attention on this many threads, on the AMX tiles or the vector code; restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if not tiles:
            native.amx_disable()
        yield
    finally:
        torch.set_num_threads(previous)
        native.amx_init()


@_every_attention_path
def test_decode_attention_of_a_row_does_not_depend_on_the_other_rows(cache_dtype, tiles, threads):
    # A row's work ends at its last unmasked position, not at the batch's longest context (whose
    # masked tail added nothing but time), and the threads share the rows by their lengths: each
    # row's output equals, bit for bit, that row attended alone over its own positions. Rows:
    # one long context among short ones, a length off every step of 8 and 16, a single position,
    # a masked hole, a row masked throughout (zeros), long rows whose keys go in parts, and
    # lengths in no order.
    _skip_unless_attention_path(cache_dtype, tiles)
    generator = torch.Generator().manual_seed(13)
    lengths = [300, 5, 17, 2100, 64, 1, 33, 3300, 120, 0]  # 2,100 and 3,300: keys in parts, merged
    batch, heads, head_dim, max_len = len(lengths), 12, 64, max(lengths)
    cache = torch.randn(2, 5000, head_dim, generator=generator).to(cache_dtype)
    query = torch.randn(batch, heads * head_dim, generator=generator)
    slots = torch.randint(0, 5000, (batch, max_len), generator=generator)
    mask = torch.zeros(batch, max_len).masked_fill_(torch.arange(max_len)[None] >= torch.tensor(lengths)[:, None],
                                                     float("-inf"))
    mask[8, 50] = float("-inf")  # a hole inside a row's context stays masked
    with _attention_path(threads, tiles):
        together = native.decode_attention(query, cache, slots, mask, heads, 1, 0.125)
        # the engine hands each row's length over instead of having the mask's tail scanned
        assert torch.equal(native.decode_attention(query, cache, slots, mask, heads, 1, 0.125, torch.tensor(lengths)),
                           together)
        for row, length in enumerate(lengths):
            if length == 0:
                assert torch.equal(together[row], torch.zeros(heads * head_dim))
                continue
            alone = native.decode_attention(query[row:row + 1], cache, slots[row:row + 1, :length],
                                            mask[row:row + 1, :length], heads, 1, 0.125)
            assert torch.equal(together[row], alone[0]), (row, length)


@_every_attention_path
def test_decode_attention_of_long_rows_in_key_parts_matches_float64(cache_dtype, tiles, threads):
    # Rows of 2,048+ keys attend in parts of 1,024 (the last up to 2,047), each part's sums kept
    # unnormalised with its maximum and total, then merged: against float64 within each path's
    # bound (tiles: the bfloat16 / split rounding of the test above; vectors: float32's). Rows:
    # a middle part with every key masked, a row whose only keys sit in its last part, a row whose
    # only key is its first, a row below the parts, one long row alone (its parts shared among the
    # threads) and two KV heads.
    _skip_unless_attention_path(cache_dtype, tiles)
    generator = torch.Generator().manual_seed(17)
    with _attention_path(threads, tiles):
        for lengths, heads, kv_heads, head_dim in (([3500, 40, 3000, 2048, 4095, 2047], 12, 1, 64), ([5000], 12, 1, 64),
                                                   ([1300, 2600], 8, 2, 32)):
            batch, max_len = len(lengths), max(lengths)
            cache = torch.randn(2, 6000, kv_heads * head_dim, generator=generator).to(cache_dtype)
            query = torch.randn(batch, heads * head_dim, generator=generator)
            slots = torch.randint(0, 6000, (batch, max_len), generator=generator)
            mask = torch.zeros(batch, max_len).masked_fill_(
                torch.arange(max_len)[None] >= torch.tensor(lengths)[:, None], float("-inf"))
            if batch == 6:
                mask[0, 1024:2048] = float("-inf")  # the second of three parts: nothing to attend to
                mask[2, :2560] = float("-inf")  # only the last part's keys
                mask[3, 1:] = float("-inf")  # only the first key
            scale = 1 / math.sqrt(head_dim)
            out = native.decode_attention(query, cache, slots, mask, heads, kv_heads, scale)

            keys = cache[0][slots].double().view(batch, max_len, kv_heads, head_dim)
            values = cache[1][slots].double().view(batch, max_len, kv_heads, head_dim)
            grouped = query.double().view(batch, kv_heads, heads // kv_heads, head_dim)
            scores = torch.einsum("bkgd,blkd->bkgl", grouped, keys) * scale + mask.double()[:, None, None, :]
            expected = torch.einsum("bkgl,blkd->bkgd", torch.softmax(scores, -1), values).reshape(batch, -1)
            bound = 1e-5 if not tiles else 1.5e-2 if cache_dtype == torch.bfloat16 else 5e-5
            error = (out.double() - expected).abs().max().item()
            assert error < bound, (lengths, error)
            # lengths given (the third and fourth rows' masked heads then go in parts too)
            given = native.decode_attention(query, cache, slots, mask, heads, kv_heads, scale, torch.tensor(lengths))
            assert (given.double() - expected).abs().max().item() < bound


@pytest.mark.parametrize("heads, head_dim", [(12, 64), (48, 128)])
def test_decode_attention_reads_whole_cache_blocks_in_place(heads, head_dim):
    # A block of 16 keys, all used, in 16 consecutive cache rows (the engine's 16-token blocks)
    # is loaded as an A tile straight from the cache; other blocks are staged row by row. The
    # same keys and values at scattered slots (all staged) give the same bits, and both match
    # float64. Rows: whole blocks and a partial last one, a masked hole (a NaN key there, which
    # must not reach the output), a block with two rows out of order, a long row in parts.
    if not native.amx_init():
        pytest.skip("no AMX tiles on this CPU (or not granted by the kernel)")
    generator = torch.Generator().manual_seed(21)
    lengths = [300, 64, 17, 2100]
    batch, max_len, blocks_per_row = len(lengths), max(lengths), (max(lengths) + 15) // 16
    blocks = torch.randperm(batch * blocks_per_row + 8, generator=generator)[:batch * blocks_per_row].view(batch, -1)
    in_blocks = (blocks[:, :, None] * 16 + torch.arange(16)).reshape(batch, -1)[:, :max_len].contiguous()
    in_blocks[1, 3:5] = in_blocks[1, 3:5].flip(0)  # a block whose first and last rows are in place, two others swapped
    slots_total = (batch * blocks_per_row + 8) * 16
    scattered = torch.randperm(slots_total, generator=generator)[:batch * max_len].view(batch, max_len)
    cache = torch.randn(2, slots_total, head_dim, generator=generator).bfloat16()
    moved = torch.zeros_like(cache)
    moved[:, scattered.flatten()] = cache[:, in_blocks.flatten()]  # the same rows, scattered
    query = torch.randn(batch, heads * head_dim, generator=generator)
    mask = torch.zeros(batch, max_len).masked_fill_(torch.arange(max_len)[None] >= torch.tensor(lengths)[:, None],
                                                     float("-inf"))
    mask[0, 37] = float("-inf")  # its block is staged: a masked row may hold anything, a NaN too
    cache[0, in_blocks[0, 37]] = float("nan")
    moved[0, scattered[0, 37]] = float("nan")
    scale = 1 / math.sqrt(head_dim)
    try:
        out = native.decode_attention(query, cache, in_blocks, mask, heads, 1, scale)
        assert torch.equal(out, native.decode_attention(query, moved, scattered, mask, heads, 1, scale))
        keys, values = (cache[i][in_blocks].double().nan_to_num() for i in (0, 1))
        scores = torch.einsum("bhd,bld->bhl", query.double().view(batch, heads, head_dim), keys) * scale
        weights = torch.softmax(scores + mask.double()[:, None, :], -1)
        expected = torch.einsum("bhl,bld->bhd", weights, values).reshape(batch, -1)
        assert (out.double() - expected).abs().max().item() < 1.5e-2
    finally:
        native.amx_init()


@pytest.mark.parametrize("head_dim", [64, 12])  # vector path (multiple of 8) and scalar path
def test_decode_attention_of_a_fully_masked_row_is_zero(head_dim):
    cache = torch.randn(2, 40, head_dim)
    query = torch.randn(2, 12 * head_dim)
    slots = torch.arange(34).reshape(2, 17)
    mask = torch.zeros(2, 17)
    mask[1] = float("-inf")  # a padding row: nothing to attend to
    out = native.decode_attention(query, cache, slots, mask, 12, 1, 0.125)
    assert torch.equal(out[1], torch.zeros(12 * head_dim)) and torch.isfinite(out[0]).all()
    # a float32 query over a 16-bit cache (16-bit models compute in float32 on a CPU)
    half = native.decode_attention(query, cache.half(), slots, mask, 12, 1, 0.125)
    assert half.dtype == torch.float32 and (half[0] - out[0]).abs().max() < 1e-2
    cache[0, 3, 1] = float("nan")  # a NaN key shows in the output, as in PyTorch's softmax
    assert torch.isnan(native.decode_attention(query, cache, slots, mask, 12, 1, 0.125)[0]).all()


def test_build_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("STARCHAT_CACHE_DIR", str(tmp_path))
    build.load.cache_clear()
    try:
        assert build.load() is not None
        built = list((tmp_path / "native").glob("kernels-*.so"))
        assert len(built) == 1 and not list((tmp_path / "native").glob("*.partial"))
        stamp = built[0].stat().st_mtime_ns
        build.load.cache_clear()
        assert build.load() is not None and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    finally:
        build.load.cache_clear()


def test_fallbacks_without_compiler_or_when_disabled(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("STARCHAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    build.load.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert build.load() is None and not native.available()
        assert "CPU kernels unavailable" in caplog.text
        build.load.cache_clear()
        monkeypatch.delenv("CC")
        monkeypatch.setenv("STARCHAT_NATIVE_KERNELS", "0")
        assert build.load() is None
    finally:
        build.load.cache_clear()


def test_a_build_without_this_cpus_flags_says_so(tmp_path, monkeypatch, caplog):
    # A compiler that rejects -march=native / -mcpu=native (or code it cannot build for this CPU)
    # still gets a generic build, but with a warning: silently losing the vector and AMX paths
    # would only show as slowness (and as skipped AMX tests).
    if build.load() is None:
        pytest.skip("no C compiler here")
    compiler = tmp_path / "cc-without-native"
    compiler.write_text('#!/bin/sh\ncase "$*" in *-march=native*|*-mcpu=native*) echo "cc: unknown -march=native" >&2; exit 1;; esac\n'
                        'exec gcc "$@"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("STARCHAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(compiler))
    build.load.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            library = build.load()
        assert library is not None and not library.starchat_linear_has_avx2()
        assert "built without -march=native (cc: unknown -march=native)" in caplog.text
    finally:
        build.load.cache_clear()


def test_avx512_tiles_give_the_avx2_tiles_results_bit_for_bit(tmp_path, monkeypatch):
    """On a CPU with AVX-512 the many-row tiles (and int8's one-row product, and the tanh GELU, alone
    or in a product's stores) are 16 wide: the same per-element operations in the same order as
    the 8-wide AVX2 code, so the same bits (built both ways here). int8 products of several rows
    take VNNI's byte dot products where the CPU has them (15-bit rows:
    test_linear_matches_float64_reference); a third build without VNNI keeps them on the 16-wide
    float32 tiles, compared here."""
    library = build.load()
    if library is None or not library.starchat_linear_has_avx512():
        pytest.skip("this CPU (or compiler) has no AVX-512: only the AVX2 tiles exist here")
    generator = torch.Generator().manual_seed(4)
    cases = []
    for weight_dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int8):
        for rows in (1, 2, 3, 6, 7, 8, 12, 13, 40, 150):  # one row (int8: 16 wide), tile heights, blocks
            weight, scales, _ = _stored(torch.randn(37, 771, generator=generator), weight_dtype)
            cases.append((torch.randn(rows, 771, generator=generator), weight, torch.randn(37, generator=generator),
                          scales))
    # the tanh GELU, 16 wide with AVX-512 (a tail of 5 past the vectors, extreme inputs)
    values = torch.cat([torch.randn(3000, generator=generator) * 4, torch.tensor([0.0, -0.0, 60.0, -60.0, 1e-30])])
    outputs = {}
    try:
        for flags in ("", "-mno-avx512vnni", "-mno-avx512f"):
            monkeypatch.setenv("STARCHAT_CACHE_DIR", str(tmp_path / (flags or "native")))
            monkeypatch.setenv("STARCHAT_NATIVE_CFLAGS", flags)
            build.load.cache_clear()
            assert build.load().starchat_linear_has_avx512() == (flags != "-mno-avx512f")
            outputs[flags] = [_product(x, weight, bias, scales) for x, weight, bias, scales in cases]
            outputs[flags].append(native.gelu_(values.clone(), tanh_approximation=True))
            for x, weight, bias, scales in cases[10:20:3]:  # float16 weights with the GELU in their stores
                outputs[flags].append(native.linear(x, native.pack_weight(weight), 37, bias, scales, gelu_tanh=True))
            if flags == "":
                vnni = native.int8_rows_quantized()
            if flags == "-mno-avx512vnni":
                assert not native.int8_rows_quantized()
    finally:
        build.load.cache_clear()
    several_int8_rows = [scales is not None and x.shape[0] > 1 for x, _, _, scales in cases] + [False] * 5
    for vnni_case, with_avx512, without_vnni, avx2 in zip(several_int8_rows, outputs[""], outputs["-mno-avx512vnni"],
                                                           outputs["-mno-avx512f"]):
        assert torch.equal(without_vnni, avx2)
        if not (vnni and vnni_case):
            assert torch.equal(with_avx512, avx2)


def test_portable_path_without_avx2(tmp_path, monkeypatch):
    """CPUs without AVX2/FMA/F16C get plain C loops: built here with those instructions turned off."""
    monkeypatch.setenv("STARCHAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("STARCHAT_NATIVE_CFLAGS", "-mno-avx2 -mno-fma -mno-f16c")
    build.load.cache_clear()
    try:
        assert native.available() and build.load().starchat_linear_has_avx2() == 0
        generator = torch.Generator().manual_seed(3)
        for weight_dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int8):
            for rows in (1, 5, 33, 150):
                x = torch.randn(rows, 67, generator=generator)
                weight, scales, dense = _stored(torch.randn(29, 67, generator=generator), weight_dtype)
                expected = x.double() @ dense.T
                error = (_product(x, weight, None, scales).double() - expected).abs().max() / expected.abs().max()
                assert error < 1e-5, (weight_dtype, rows, float(error))
                packed = native.pack_weight(weight)  # the tanh GELU in the stores: the separate pass's scalar bits
                assert torch.equal(native.linear(x, packed, 29, None, scales, gelu_tanh=True),
                                   native.gelu_(native.linear(x, packed, 29, None, scales), True))
            if weight_dtype in (torch.bfloat16, torch.int8):  # the unpacking's plain loop
                assert torch.equal(native.unpack_bf16(native.pack_weight(weight), 29), weight.to(torch.bfloat16))
            if weight_dtype != torch.int8:  # the quantizer's plain loops: the PyTorch formula's bits
                quantized, quantized_scales = native.quantize_per_channel(weight)
                reference = quantize_in_slices(weight)
                assert torch.equal(quantized, reference[0]) and torch.equal(quantized_scales, reference[1])
        cache = torch.randn(2, 50, 32, generator=generator).half()
        query = torch.randn(2, 128, generator=generator).half()
        slots = torch.randint(0, 50, (2, 9), generator=generator)
        mask = torch.zeros(2, 9)
        out = native.decode_attention(query, cache, slots, mask, 4, 1, 0.25)
        keys, values = cache[0][slots].double(), cache[1][slots].double()  # (2, 9, 32)
        scores = torch.einsum("bhd,bld->bhl", query.double().view(2, 4, 32), keys) * 0.25
        expected = torch.einsum("bhl,bld->bhd", torch.softmax(scores, -1), values).reshape(2, 128)
        assert (out.double() - expected).abs().max() < 1e-2
    finally:
        build.load.cache_clear()


@pytest.mark.skipif(not native.available(), reason="no C compiler")
@pytest.mark.parametrize("tanh", [True, False])
def test_gelu_in_place_matches_float64(tanh):
    """The module path's GELU on a CPU (cpu_linear.native_tanh_gelu; the decode step's arithmetic),
    over a count that is neither a multiple of 8 nor of the 512-value chunks, far into both tails."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1001, generator=generator) * 4
    x[0, :6] = torch.tensor([-30.0, -9.0, -1e-3, 0.0, 9.0, 30.0])
    inputs = x.double()
    expected = torch.nn.functional.gelu(inputs, approximate="tanh" if tanh else "none")
    out = native.gelu_(x, tanh)
    assert out.data_ptr() == x.data_ptr()
    assert (out.double() - expected).abs().max() < 2e-6
    if tanh:  # x / (1 + 2^z): no cancellation in the negative tail (1 + tanh lost it: zero from -5.07,
        # and float64's 1 + tanh loses it below -6: the reference is x sigmoid(2u), the same function)
        u = 0.7978845608028654 * (inputs + 0.044715 * inputs ** 3)
        stable = inputs * torch.sigmoid(2 * u)
        shown = stable.abs() > 1e-30
        # (float32's rounding of z, up to 100 in the tail, is the 1e-5: the function's own conditioning)
        assert ((out.double() - stable)[shown] / stable[shown]).abs().max() < 1e-5
    with pytest.raises(ValueError):
        native.gelu_(torch.zeros(4, dtype=torch.float16), tanh)


def _separate_gelu(out: torch.Tensor) -> torch.Tensor:
    """gelu_ over a product's float32 output padded to whole panels of 16 columns, so that every
    value takes the vector code, as in a fused product's stores (a count's last few values take
    the scalar code in gelu_)."""
    padded = torch.nn.functional.pad(out.reshape(-1, out.shape[-1]), (0, -out.shape[-1] % 16)).contiguous()
    return native.gelu_(padded, True)[:, :out.shape[-1]].reshape(out.shape)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_products_with_the_tanh_gelu_give_the_separate_gelus_bits(weight_dtype):
    """An MLP's up projection applies the tanh GELU in its stores (kernels.h: store_tile_rows, and
    amx.c's full float32 tiles, which go to the output directly): after scales and bias, before any
    rounding to 16 bits, the bits of the separate pass (gelu_). Every path: one row, the register
    tiles, VNNI rows, AMX tiles (bfloat16, AMX-INT8, float16 split, full float32 tiles stored
    straight into the output and partial ones through the store loop), a partial last panel."""
    generator = torch.Generator().manual_seed(21)
    amx = native.amx_init()
    for out_features, in_features in ((96, 64), (37, 771), (3072, 768)):
        weight, scales, _ = _stored(torch.randn(out_features, in_features, generator=generator) / 8, weight_dtype)
        packed, bias = native.pack_weight(weight), torch.randn(out_features, generator=generator)
        for rows in (1, 3, 8, 17, 100):
            x = torch.randn(rows, in_features, generator=generator)
            for amx_min_rows in ((0, 8) if amx else (0,)):
                plain = native.linear(x, packed, out_features, bias, scales, amx_min_rows)
                fused = native.linear(x, packed, out_features, bias, scales, amx_min_rows, gelu_tanh=True)
                assert torch.equal(fused, _separate_gelu(plain)), (out_features, in_features, rows, amx_min_rows)
                expected = torch.nn.functional.gelu(plain.double(), approximate="tanh")
                assert (fused.double() - expected).abs().max() < 2e-6
                rounded_in = x.to(torch.bfloat16)  # 16-bit outputs: the GELU of the float32 sums, rounded once
                assert torch.equal(
                    native.linear(rounded_in, packed, out_features, bias, scales, amx_min_rows, gelu_tanh=True),
                    _separate_gelu(native.linear(rounded_in.float(), packed, out_features, bias, scales,
                                                 amx_min_rows)).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cache_writes_give_pytorchs_conversion_and_copy(dtype):
    """The module path's cache write on a CPU (native.write_cache): the new rows' keys and values
    (views of the fused projection's output) into their slots with the bits of PyTorch's dtype
    conversion and index_copy_, a width with a tail past the 8-wide vectors, rounding edge
    values; a slot outside the cache writes nothing and raises."""
    generator = torch.Generator().manual_seed(23)
    for width in (64, 20):
        qkv = torch.randn(37, 3 * width + 5, generator=generator) * 100
        qkv[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40, 70000.0, -0.0])
        key, value = qkv[:, 5:5 + width], qkv[:, 5 + width:5 + 2 * width]
        slots = torch.randperm(90, generator=generator)[:37]
        ours, expected = torch.zeros(2, 90, width, dtype=dtype), torch.zeros(2, 90, width, dtype=dtype)
        assert native.write_cache_applies(ours, key, value, slots)
        native.write_cache(ours, key, value, slots)
        expected[0].index_copy_(0, slots, key.to(dtype))
        expected[1].index_copy_(0, slots, value.to(dtype))
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(ours.isnan(), expected.isnan())  # NaN payloads aside, the same bits (-0.0 included)
        assert torch.equal(ours.view(bits)[~ours.isnan()], expected.view(bits)[~expected.isnan()])
        before = ours.clone()
        with pytest.raises(IndexError, match="outside the cache"):
            native.write_cache(ours, key, value, torch.cat([slots[:-1], torch.tensor([90])]))
        assert torch.equal(ours.view(bits), before.view(bits))
    assert not native.write_cache_applies(ours, key.t().contiguous().t(), value, slots)  # column stride 37
    assert not native.write_cache_applies(ours, key.double(), value.double(), slots)
    assert not native.write_cache_applies(ours, key, value, slots.int())


def test_add_layer_norm_matches_float64_and_adds_in_place():
    """The module path's residual add and layer norm on a CPU (native.add_layer_norm_): the sum
    written into hidden with PyTorch's float32 add's bits, the norm against float64."""
    generator = torch.Generator().manual_seed(22)
    for rows, width in ((1, 64), (7, 771), (512, 768)):
        hidden, delta = torch.randn(rows, width, generator=generator) * 3, torch.randn(rows, width, generator=generator)
        weight, bias = torch.randn(width, generator=generator), torch.randn(width, generator=generator)
        expected_sum = hidden + delta
        summed, normed = native.add_layer_norm_(hidden, delta, weight, bias, 1e-5)
        assert summed.data_ptr() == hidden.data_ptr() and torch.equal(summed, expected_sum)
        expected = torch.nn.functional.layer_norm(expected_sum.double(), (width,), weight.double(), bias.double(), 1e-5)
        assert (normed.double() - expected).abs().max() < 1e-5 * expected.abs().max()
        unchanged = hidden.clone()
        same, normed = native.add_layer_norm_(hidden, None, weight, bias, 1e-5)
        assert torch.equal(same, unchanged)
        expected = torch.nn.functional.layer_norm(unchanged.double(), (width,), weight.double(), bias.double(), 1e-5)
        assert (normed.double() - expected).abs().max() < 1e-5 * expected.abs().max()
    rows = torch.zeros(4, 8)
    assert not native.add_layer_norm_applies(rows.t(), None, torch.ones(4), torch.zeros(4))  # not contiguous
    assert not native.add_layer_norm_applies(rows.bfloat16(), None, torch.ones(8), torch.zeros(8))
    assert not native.add_layer_norm_applies(rows, rows.t().contiguous().t(), torch.ones(8), torch.zeros(8))
    assert native.add_layer_norm_applies(rows, rows, torch.ones(8), torch.zeros(8))
    assert not native.add_layer_norm_applies(rows.requires_grad_(), None, torch.ones(8), torch.zeros(8))
    with pytest.raises(ValueError, match="add_layer_norm"):
        native.add_layer_norm_(torch.zeros(4, 8), torch.zeros(4, 9), torch.ones(8), torch.zeros(8), 1e-5)


@pytest.mark.skipif(not native.available(), reason="no C compiler")
def test_packed_models_fuse_the_tanh_gelu_into_their_up_projections(tiny_model_dir, tiny_mha_model_dir):
    from starchat import LLM
    from starchat.model.gpt_bigcode import MLP

    tanh_mlps = [m for m in LLM(str(tiny_model_dir), dtype="float32", progress=False).engine.runner.model.modules()
                 if isinstance(m, MLP)]
    assert tanh_mlps and all(m.fused_activation for m in tanh_mlps)
    exact_mlps = [m for m in LLM(str(tiny_mha_model_dir), dtype="float32", progress=False).engine.runner.model.modules()
                  if isinstance(m, MLP)]
    assert exact_mlps and not any(m.fused_activation for m in exact_mlps)  # the exact GELU: PyTorch's, separate


def test_linear_writes_into_a_given_output():
    generator = torch.Generator().manual_seed(15)
    x, weight = torch.randn(5, 64, generator=generator), torch.randn(48, 64, generator=generator).bfloat16()
    packed, bias = native.pack_weight(weight), torch.randn(48, generator=generator)
    out = torch.full((5, 48), float("nan"))
    assert native.linear(x, packed, 48, bias, out=out) is out
    assert torch.equal(out, native.linear(x, packed, 48, bias))
    with pytest.raises(ValueError, match="out must be"):
        native.linear(x, packed, 48, bias, out=torch.empty(5, 47))
