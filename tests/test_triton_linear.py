"""The GPU product kernel (model/triton_linear.py), over int8 and 16-bit weights, run by Triton's
interpreter on the CPU against float64 products, and the load-time choice between it and cuBLAS
(model/tuned_linear.py). On a GPU, tests/test_cuda.py runs them compiled. In an ordinary test run
this module runs itself in a child pytest under the interpreter (tests/triton_interpreter.py).
"""

from __future__ import annotations


import pytest
import torch

from starchat.model.quant import quantize_per_channel
from triton_interpreter import INTERPRETED, run_under_interpreter

pytest.importorskip("triton")


@pytest.mark.skipif(INTERPRETED, reason="this is the child run")
def test_kernel_under_the_interpreter_in_a_child_process():
    run_under_interpreter(__file__)


@pytest.fixture
def kernels():
    if not INTERPRETED:
        pytest.skip("runs in the child process (TRITON_INTERPRET=1)")
    from starchat.model import triton_linear

    return triton_linear


def reference(x, weight, scales, bias):
    out = x.double() @ (weight.double() * scales.double()[:, None]).T
    return out + bias.double() if bias is not None else out


# bfloat16 is left to tests/test_cuda.py: Triton 3.9's interpreter computes bfloat16 conversions and
# dot products in numpy, which has no bfloat16 (it returns garbage, checked by hand); the kernel's
# code is the same for every 16-bit type.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,in_features", [(1, 200), (5, 200), (17, 200), (64, 200), (100, 200), (3, 2100)])
def test_int8_product_equals_dequantized_reference(kernels, dtype, rows, in_features):
    generator = torch.Generator().manual_seed(rows)
    # 80 outputs, 200 or 2,100 inputs: not a multiple of the column or depth blocks (masked edges);
    # 2,100 takes the wide depth blocks of large layers.
    weight, scales = quantize_per_channel(torch.randn(80, in_features, generator=generator))
    bias = torch.randn(80, generator=generator).to(dtype)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    for with_bias in (bias, None):
        out = kernels.linear(x, weight, scales.to(dtype), with_bias)
        assert out.dtype == dtype and out.shape == (rows, 80)
        expected = reference(x, weight, scales.to(dtype), with_bias)
        # The kernel sums in float32; 16-bit outputs are rounded once at the end.
        tolerance = 1e-4 if dtype == torch.float32 else 1e-2
        assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def test_batched_shapes_and_rows_beyond_one_pass(kernels):
    weight, scales = quantize_per_channel(torch.randn(48, 64))
    x = torch.randn(2, 3, 64)
    out = kernels.linear(x, weight, scales, None)
    assert out.shape == (2, 3, 48)
    assert torch.allclose(out.double(), reference(x.reshape(6, 64), weight, scales, None).reshape(2, 3, 48), rtol=1e-4, atol=1e-3)
    assert kernels.supports(torch.randn(kernels.MAX_ROWS, 64))
    assert not kernels.supports(torch.randn(kernels.MAX_ROWS + 1, 64))  # prefill chunks: cuBLAS
    # rows beyond one pass: row blocks of ROWS_PER_PASS, a ragged last one, with tuned blocks too
    x = torch.randn(kernels.MAX_ROWS - 3, 64)
    for blocks in (None, (kernels.ROWS_PER_PASS, 32, 64, 4), (16, 16, 32, 4)):
        out = kernels.linear(x, weight, scales, None, blocks)
        assert torch.allclose(out.double(), reference(x, weight, scales, None), rtol=1e-4, atol=1e-3), blocks
    assert not kernels.supports(torch.zeros(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="do not fit"):
        kernels.linear(torch.randn(2, 63), weight, scales, None)


def test_every_tuning_candidate_is_right_at_every_row_count_its_bucket_serves(kernels):
    """Tuning checks a candidate at its bucket's row count (1, 16, 64, 128); the choice then serves
    every row count up to that bucket (17..64 rows take the 64 bucket's tiles). Random shapes, not
    multiples of the tiles, each candidate of each bucket's pool at a random row count it serves."""
    import random

    from starchat.model.tuned_linear import CANDIDATES, INT8_CANDIDATES, ROW_CANDIDATES, WIDE_CANDIDATES

    rng = random.Random(7)
    served = {1: (1, 1), 16: (2, 16), 64: (17, 64), 128: (65, 128)}
    for bucket, (fewest, most) in served.items():
        for quantized in (False, True):
            pool = [(kernels.block_rows(bucket), *choice) for choice in
                    (WIDE_CANDIDATES if bucket > 16 else INT8_CANDIDATES if quantized else CANDIDATES)]
            if bucket == 1:
                pool += [(1, *choice) for choice in ROW_CANDIDATES]
            for blocks in pool:
                rows, out_features = rng.randint(fewest, most), rng.randint(1, 150)
                in_features = 4 * rng.randint(1, 150) if blocks[0] == 1 else rng.randint(1, 600)
                dense = torch.randn(out_features, in_features) * 0.05
                weight, scales = quantize_per_channel(dense) if quantized else (dense.half(), None)
                bias = torch.randn(out_features).half() if rng.random() < 0.5 else None
                x = torch.randn(rows, in_features).half()
                out = kernels.linear(x, weight, scales, bias, blocks)
                expected = reference(x, weight, scales if quantized else torch.ones(out_features), bias)
                torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2,
                                           msg=lambda m: f"{blocks} at {rows} x {in_features} -> {out_features}: {m}")


def test_without_the_interpreter_only_gpus_qualify(kernels, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not kernels.supports(torch.randn(2, 64))  # a CPU tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 16, 33, 128])
def test_16_bit_weight_product_equals_reference(kernels, dtype, rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(80, 200, generator=generator).to(dtype)
    bias = torch.randn(80, generator=generator).to(dtype)
    x = torch.randn(rows, 200, generator=generator).to(dtype)
    for with_bias in (bias, None):
        out = kernels.linear(x, weight, None, with_bias)
        expected = x.double() @ weight.double().T + (with_bias.double() if with_bias is not None else 0)
        tolerance = 1e-4 if dtype == torch.float32 else 1e-2
        assert out.dtype == dtype
        assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    with pytest.raises(ValueError, match="do not fit"):  # a 16-bit weight of another dtype than the input
        kernels.linear(x, weight.to(torch.bfloat16 if dtype == torch.float16 else torch.float16))


ROW_BLOCKS = [(1, 16, 64, 4, 1), (1, 32, 128, 4, 3), (1, 16, 256, 8)]  # the last without a stage count


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("out_features,in_features", [(80, 200), (64, 256), (49, 1028)])
def test_row_kernel_equals_reference(kernels, dtype, quantized, out_features, in_features):
    """The one-row kernel (blocks with BLOCK_M = 1), int8 weights widened from 32-bit words and
    16-bit ones, on even and ragged shapes (masked column and depth edges), for several rows (each
    its own program), with and without bias and GELU. int8 weights span -127..127 (every byte value
    the sign flip has to get right, negative ones included)."""
    generator = torch.Generator().manual_seed(out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    weight, scales = quantize_per_channel(weight) if quantized else (weight.to(dtype), None)
    if quantized:
        assert weight.min() == -127 and weight.max() == 127
        scales = scales.to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype)
    x = torch.randn(3, in_features, generator=generator).to(dtype)
    product = x.double() @ (weight.double() * (scales.double()[:, None] if quantized else 1)).T
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    for blocks in ROW_BLOCKS:
        for with_bias, gelu in ((None, False), (bias, False), (bias, True)):
            expected = product + (with_bias.double() if with_bias is not None else 0)
            expected = gelu_tanh_reference(expected) if gelu else expected
            out = kernels.linear(x, weight, scales, with_bias, blocks, gelu_tanh=gelu)
            assert out.dtype == dtype and out.shape == (3, out_features)
            assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item()), blocks


def test_row_kernel_needs_int8_rows_of_whole_words(kernels, monkeypatch):
    """int8 weights whose rows are not a multiple of 4 bytes cannot be read as words: the row
    blocks then run the tiled kernel, with the same result, and tuning does not try them."""
    from torch import nn

    from starchat.model import tuned_linear
    from starchat.model.quant import Int8Linear

    weight, scales = quantize_per_channel(torch.randn(40, 82))
    assert not kernels.row_kernel_fits(weight) and kernels.row_kernel_fits(weight.float())
    assert kernels.row_kernel_fits(quantize_per_channel(torch.randn(40, 84))[0])
    x = torch.randn(1, 82)
    expected = reference(x, weight, scales, None)
    assert torch.allclose(kernels.linear(x, weight, scales, None, (1, 16, 64, 4)).double(), expected, rtol=1e-4, atol=1e-3)
    model = nn.Sequential(Int8Linear.from_float(torch.randn(40, 82), None, torch.float32))
    tried = []
    real_linear = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda *args, **kwargs: tried.append(args[4]) or real_linear(*args, **kwargs))
    monkeypatch.setattr(tuned_linear, "per_call_us", lambda fn, device: 1.0)  # each candidate already ran once, checked
    tuned_linear.tune_decode_products(model, torch.float32, candidates=((32, 128, 4),), row_candidates=((16, 64, 4, 1),))
    assert tried and all(blocks[0] != 1 for blocks in tried)


def test_tuning_takes_the_row_kernel_where_it_is_fastest(kernels, monkeypatch):
    from torch import nn

    from starchat.model import tuned_linear
    from starchat.model.quant import Int8Linear

    model = nn.Sequential(nn.Linear(64, 80), Int8Linear.from_float(torch.randn(48, 80), torch.randn(48), torch.float32))
    current = {}
    real_linear = kernels.linear

    def recording_linear(x, weight, scales=None, bias=None, blocks=None, gelu_tanh=False):
        current["blocks"] = blocks
        return real_linear(x, weight, scales, bias, blocks, gelu_tanh=gelu_tanh)

    def fake_timing(fn, device):  # the row kernel with 2 stages is fastest; cuBLAS slowest
        current["blocks"] = None
        fn()
        blocks = current["blocks"]
        return 100.0 if blocks is None else 10.0 if blocks == (1, 16, 64, 4, 2) else 50.0

    monkeypatch.setattr(kernels, "linear", recording_linear)
    monkeypatch.setattr(tuned_linear, "per_call_us", fake_timing)
    report = tuned_linear.tune_decode_products(model, torch.float32, candidates=((32, 128, 4),),
                                              row_candidates=((16, 64, 4, 1), (16, 64, 4, 2)))
    monkeypatch.setattr(kernels, "linear", real_linear)
    assert model[0].tuned == model[1].tuned == {1: (1, 16, 64, 4, 2), 16: (16, 32, 128, 4), 64: (64, 32, 128, 4),
                                                128: (64, 32, 128, 4)}
    assert [row["blocks"] for row in report if row["rows"] == 1] == [(1, 16, 64, 4, 2)] * 2
    for module in model:
        x = torch.randn(1, module.in_features)
        weight = module.weight.double() * (module.scales.double()[:, None] if hasattr(module, "scales") else 1)
        expected = x.double() @ weight.T + module.bias.double()
        assert torch.allclose(module(x).double(), expected, rtol=1e-4, atol=1e-3)


def test_tuning_tries_each_row_bucket_with_its_own_tiles(kernels, monkeypatch):
    """Up to 16 rows: 16-row tiles of CANDIDATES (INT8_CANDIDATES for int8 weights), and the row
    kernel at one row; 64 and 128 rows: 64-row tiles of WIDE_CANDIDATES."""
    from torch import nn

    from starchat.model import tuned_linear
    from starchat.model.quant import Int8Linear

    model = nn.Sequential(nn.Linear(64, 80), Int8Linear.from_float(torch.randn(48, 80), torch.randn(48), torch.float32))
    tried = []

    def exact_product(x, weight, scales=None, bias=None, blocks=None, gelu_tanh=False):  # no kernel run: only the choices
        tried.append((weight.dtype, x.shape[0], blocks))
        return tuned_linear.reference_product(x, weight, scales, bias, gelu_tanh).to(x.dtype)

    monkeypatch.setattr(kernels, "linear", exact_product)
    monkeypatch.setattr(tuned_linear, "per_call_us", lambda fn, device: 1.0)
    tuned_linear.tune_decode_products(model, torch.float32, row_candidates=((16, 64, 4, 1),))
    for weight_dtype, narrow in ((torch.float32, tuned_linear.CANDIDATES), (torch.int8, tuned_linear.INT8_CANDIDATES)):
        by_rows = {rows: [blocks for dtype, at, blocks in tried if dtype == weight_dtype and at == rows]
                   for rows in tuned_linear.DECODE_ROW_BUCKETS}
        assert by_rows[1] == [(16, *blocks) for blocks in narrow] + [(1, 16, 64, 4, 1)]
        assert by_rows[16] == [(16, *blocks) for blocks in narrow]
        assert by_rows[64] == by_rows[128] == [(kernels.ROWS_PER_PASS, *blocks) for blocks in tuned_linear.WIDE_CANDIDATES]


def test_tuning_drops_a_candidate_that_computes_a_wrong_product(kernels, monkeypatch, caplog):
    """A kernel configuration that a GPU's compiler gets wrong must never be chosen, however fast."""
    from torch import nn

    from starchat.model import tuned_linear

    model = nn.Sequential(nn.Linear(64, 80))
    real_linear = kernels.linear
    broken = (1, 16, 64, 4, 1)

    def linear(x, weight, scales=None, bias=None, blocks=None, gelu_tanh=False):
        out = real_linear(x, weight, scales, bias, blocks, gelu_tanh=gelu_tanh)
        return out * 1.1 if blocks == broken else out

    def fake_timing(fn, device):  # the broken configuration would be by far the fastest
        args = getattr(fn, "args", ())  # a kernel candidate's: (x, weight, scales, bias, blocks)
        return 1.0 if len(args) == 5 and args[4] == broken else 50.0

    monkeypatch.setattr(kernels, "linear", linear)
    monkeypatch.setattr(tuned_linear, "per_call_us", fake_timing)
    with caplog.at_level("WARNING", logger="starchat.model"):
        report = tuned_linear.tune_decode_products(model, torch.float32, candidates=((32, 128, 4),),
                                                   row_candidates=((16, 64, 4, 1), (16, 64, 4, 2)))
    assert "wrong product" in caplog.text and str(broken) in caplog.text
    assert model[0].tuned[1] != broken and all(row["blocks"] != broken for row in report)


def test_int8_layers_dequantize_where_no_candidate_runs(kernels, monkeypatch):
    """A GPU on which every kernel candidate fails (compiler, resources) keeps int8 layers on the
    dequantizing product at every row count, instead of the kernel's untried built-in blocks."""
    from starchat.model import tuned_linear
    from starchat.model.quant import Int8Linear

    layer = Int8Linear.from_float(torch.randn(48, 80), torch.randn(48), torch.float32)
    x = torch.randn(3, 80)
    expected = x.double() @ (layer.weight.double() * layer.scales.double()[:, None]).T + layer.bias.double()
    untuned = layer(x)  # the kernel's built-in blocks before tuning
    assert torch.allclose(untuned.double(), expected, rtol=1e-4, atol=1e-3)

    def failing(*args, **kwargs):
        raise RuntimeError("out of resources")

    monkeypatch.setattr(kernels, "linear", failing)
    assert tuned_linear.tune_decode_products(layer, torch.float32) == []
    assert layer.tuned == {rows: None for rows in tuned_linear.DECODE_ROW_BUCKETS}
    assert torch.allclose(layer(x).double(), expected, rtol=1e-4, atol=1e-3)  # the kernel was not called


def test_tuning_keeps_the_kernel_only_where_it_wins(kernels, monkeypatch):
    from torch import nn

    from starchat.model import tuned_linear
    from starchat.model.quant import Int8Linear

    model = nn.Sequential(nn.Linear(64, 80), nn.Linear(64, 80), nn.Linear(80, 48, bias=False),
                          Int8Linear.from_float(torch.randn(48, 80), torch.randn(48), torch.float32))

    def fake_timing(fn, device):  # the kernel wins at one row, loses at 16; block (32, 128, 4) is the fastest
        fake_timing.current = None
        fn()
        if fake_timing.current is None:  # cuBLAS ran (for int8 weights after dequantizing them)
            return 100.0
        rows, blocks = fake_timing.current
        return (50.0 if rows == 1 else 150.0) - (10.0 if blocks[1:] == (32, 128, 4) else 0.0)

    real_linear = kernels.linear

    def recording_linear(x, weight, scales=None, bias=None, blocks=None, gelu_tanh=False):
        fake_timing.current = (x.shape[0], blocks)
        return real_linear(x, weight, scales, bias, blocks, gelu_tanh=gelu_tanh)

    monkeypatch.setattr(tuned_linear, "per_call_us", fake_timing)
    monkeypatch.setattr(kernels, "linear", recording_linear)
    report = tuned_linear.tune_decode_products(model, torch.float32, candidates=((16, 128, 4), (32, 128, 4)))
    monkeypatch.setattr(kernels, "linear", real_linear)
    assert len(report) == 12  # (64->80 with bias, 80->48 without, int8 80->48) x (1, 16, 64, 128 rows)
    assert all(type(module) is tuned_linear.TunedLinear for module in model[:3])  # same parameters, new forward
    assert model[0].tuned == model[1].tuned == model[3].tuned == {1: (16, 32, 128, 4), 16: None, 64: None, 128: None}
    assert {row["chosen"] for row in report if row["rows"] > 1} == {"cublas"}

    calls = []
    monkeypatch.setattr(kernels, "linear", lambda *args, **kwargs: calls.append(args[-1]) or real_linear(*args, **kwargs))
    for rows in (1, 16, 40):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(model[0](x), x @ model[0].weight.T + model[0].bias, rtol=1e-5, atol=1e-5)
    assert calls == [(16, 32, 128, 4)]  # one row: the kernel; 16 and 40 rows: cuBLAS
    for rows, kernel in ((1, True), (5, False)):  # int8: the kernel at one row, the dequantizing product at 5
        calls.clear()
        x = torch.randn(rows, 80)
        expected = x.double() @ (model[3].weight.double() * model[3].scales.double()[:, None]).T + model[3].bias.double()
        assert torch.allclose(model[3](x).double(), expected, rtol=1e-4, atol=1e-3)
        assert calls == ([(16, 32, 128, 4)] if kernel else [])


def test_tuning_with_real_timings_gives_right_products(kernels):
    from torch import nn

    from starchat.model import tuned_linear

    model = nn.Sequential(nn.Linear(96, 40))
    report = tuned_linear.tune_decode_products(model, torch.float32, candidates=((32, 128, 4),))
    assert {row["rows"] for row in report} == {1, 16, 64, 128} and all(row["kernel_us"] > 0 for row in report)
    x = torch.randn(1, 96)
    torch.testing.assert_close(model(x), x @ model[0].weight.T + model[0].bias, rtol=1e-5, atol=1e-5)


def gelu_tanh_reference(values: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(values.double(), approximate="tanh")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("quantized", [False, True])
def test_gelu_epilogue_equals_the_product_then_gelu(kernels, dtype, quantized):
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(80, 200, generator=generator)
    weight, scales = quantize_per_channel(weight) if quantized else (weight.to(dtype), None)
    scales = None if scales is None else scales.to(dtype)
    bias = torch.randn(80, generator=generator).to(dtype)
    # values far into both tails: tanh's form must not overflow or lose the sign there
    x = (torch.randn(5, 200, generator=generator) * 4).to(dtype)
    product = x.double() @ (weight.double() * (scales.double()[:, None] if quantized else 1)).T + bias.double()
    assert product.min() < -20 and product.max() > 20
    out = kernels.linear(x, weight, scales, bias, gelu_tanh=True)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    expected = gelu_tanh_reference(product)
    assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    if quantized:  # Int8Linear passes the flag to the kernel (under the interpreter CPU tensors take it)
        from starchat.model.quant import Int8Linear

        layer = Int8Linear(200, 80, True, dtype)
        layer.weight.data, layer.scales.data, layer.bias.data = weight, scales, bias
        assert torch.allclose(layer(x, gelu_tanh=True).double(), expected, rtol=tolerance,
                              atol=tolerance * expected.abs().max().item())


def test_tuning_times_the_gelu_layers_with_their_gelu(kernels, monkeypatch):
    from torch import nn

    from starchat.model import tuned_linear
    from starchat.model.gpt_bigcode import MLP
    from starchat.config import ModelConfig

    mlp = MLP(ModelConfig(n_embd=64, n_inner=96, n_head=4, n_layer=1, vocab_size=100, n_positions=32))
    model = nn.ModuleDict({"mlp": mlp, "same_shape_no_gelu": nn.Linear(64, 96)})
    x = torch.randn(3, 64)
    before = mlp(x)
    assert tuned_linear.fuse_gelu_into_products(model, torch.float32) == 1
    assert mlp.fused_activation and type(mlp.c_fc) is tuned_linear.TunedLinear
    timed = []

    def fake_timing(fn, device):  # notes whether what was timed applied a GELU (its minimum is -0.17)
        timed.append(bool(fn().min() >= -0.171))
        return 1.0

    seen = []
    real_linear = kernels.linear
    monkeypatch.setattr(tuned_linear, "per_call_us", fake_timing)
    monkeypatch.setattr(kernels, "linear", lambda *args, **kwargs: seen.append(kwargs.get("gelu_tanh")) or real_linear(*args, **kwargs))
    report = tuned_linear.tune_decode_products(model, torch.float32, candidates=((32, 128, 4),), row_candidates=())
    # c_fc with its GELU and the plain Linear of the same shape are timed apart (c_proj: no GELU)
    up = [(row["gelu_epilogue"], row["rows"]) for row in report if row["shape"] == (96, 64)]
    buckets = tuned_linear.DECODE_ROW_BUCKETS
    assert sorted(up) == sorted((gelu, rows) for gelu in (False, True) for rows in buckets)
    # each candidate checked once, then timed, per row bucket; of three layers, c_fc with its GELU
    assert sorted(seen) == [False] * 4 * len(buckets) + [True] * 2 * len(buckets)
    # per layer shape and row bucket: the kernel and cuBLAS; both with the GELU for c_fc
    assert sorted(timed) == [False] * 4 * len(buckets) + [True] * 2 * len(buckets)
    monkeypatch.setattr(kernels, "linear", real_linear)
    torch.testing.assert_close(mlp(x), before, rtol=1e-5, atol=1e-5)  # the fused MLP computes the same


def test_gelu_epilogue_is_used_only_where_it_gives_the_tanh_gelu(monkeypatch):
    """cuBLASLt's GELU epilogue (torch._addmm_activation) is checked at load; a wrong one (here the
    exact GELU, as PyTorch's CPU fallback computes) is not used."""
    from starchat.model import tuned_linear

    cpu = torch.device("cpu")
    calls = []

    def epilogue(approximate):
        def fused(bias, x, weight_t, use_gelu=False):
            calls.append(x.shape[0])
            return torch.nn.functional.gelu(torch.addmm(bias, x, weight_t), approximate=approximate)
        return fused

    weight, bias, x = torch.randn(40, 24), torch.randn(40), torch.randn(2, 3, 24)
    expected = gelu_tanh_reference(x.double() @ weight.double().T + bias.double())
    for approximate, accepted in (("none", False), ("tanh", True)):
        monkeypatch.setattr(torch, "_addmm_activation", epilogue(approximate))
        monkeypatch.setattr(tuned_linear, "_EPILOGUE_CHECKED", {})
        assert tuned_linear.check_gelu_epilogue(cpu, torch.float32) is accepted
        calls.clear()
        out = tuned_linear.cublas_linear_gelu(x, weight, bias)
        assert calls == ([6] if accepted else [])  # rows flattened into one product
        assert out.shape == (2, 3, 40)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.delattr(torch, "_addmm_activation")  # a PyTorch without the private op
    assert tuned_linear.check_gelu_epilogue(cpu, torch.float32) is False


def _cache_on(monkeypatch, folder):
    monkeypatch.setenv("STARCHAT_TUNING_CACHE", "1")
    monkeypatch.setenv("STARCHAT_CACHE_DIR", str(folder))


def _first_tuning(kernels, tuned_linear, model, monkeypatch, products=None):
    """Tune `model` with the default candidates and fake timings: the row kernel's first candidate
    wins at one row, the 16-row tile (32, 128, 4) at 16 rows, cuBLAS at 64 and 128. The products
    are PyTorch's (no kernel runs) unless `products` is given. Returns the report and how many
    candidates were timed."""
    timed = []

    def exact_product(x, weight, scales=None, bias=None, blocks=None, gelu_tanh=False):
        return tuned_linear.reference_product(x, weight, scales, bias, gelu_tanh).to(x.dtype)

    def fake_timing(fn, device):
        args = getattr(fn, "args", ())
        if len(args) != 5:  # cuBLAS
            return 100.0
        timed.append(args[4])
        return {(1, *tuned_linear.ROW_CANDIDATES[0]): 10.0, (16, 32, 128, 4): 20.0}.get(args[4], 200.0)

    monkeypatch.setattr(kernels, "linear", products or exact_product)
    monkeypatch.setattr(tuned_linear, "per_call_us", fake_timing)
    report = tuned_linear.tune_decode_products(model, torch.float32)
    return report, len(timed)


def test_tuning_choices_are_kept_and_checked_on_the_next_start(kernels, monkeypatch, tmp_path):
    """The second load of a model in the same environment times nothing: it runs each stored
    choice once against PyTorch's product (the real kernel here) and uses it."""
    from torch import nn

    from starchat.model import tuned_linear

    _cache_on(monkeypatch, tmp_path)
    real_linear = kernels.linear
    first = nn.Sequential(nn.Linear(64, 80), nn.Linear(80, 48))
    report, timed = _first_tuning(kernels, tuned_linear, first, monkeypatch)
    row_choice = (1, *tuned_linear.ROW_CANDIDATES[0])
    assert timed > 2 and not any(row.get("cached") for row in report)
    assert first[0].tuned == first[1].tuned == {1: row_choice, 16: (16, 32, 128, 4), 64: None, 128: None}
    files = list((tmp_path / "tuning").glob("*.json"))
    assert len(files) == 1

    calls = []

    def must_not_time(fn, device):
        raise AssertionError("timed again although the choices were stored")

    monkeypatch.setattr(tuned_linear, "per_call_us", must_not_time)
    monkeypatch.setattr(kernels, "linear", lambda *args, **kwargs: calls.append(args[4]) or real_linear(*args, **kwargs))
    second = nn.Sequential(nn.Linear(64, 80), nn.Linear(80, 48))  # other weights, same shapes
    cached_report = tuned_linear.tune_decode_products(second, torch.float32)
    assert all(row.pop("cached") for row in cached_report) and cached_report == report
    assert second[0].tuned == second[1].tuned == first[0].tuned
    assert sorted(calls) == sorted([row_choice, (16, 32, 128, 4)] * 2)  # each choice checked once per shape
    monkeypatch.setattr(kernels, "linear", real_linear)
    for rows in (1, 16):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(second[0](x), x @ second[0].weight.T + second[0].bias, rtol=1e-5, atol=1e-5)


def test_a_stored_choice_that_fails_its_check_is_timed_again(kernels, monkeypatch, tmp_path, caplog):
    import json

    from torch import nn

    from starchat.model import tuned_linear

    _cache_on(monkeypatch, tmp_path)
    real_linear = kernels.linear
    _first_tuning(kernels, tuned_linear, nn.Sequential(nn.Linear(64, 80)), monkeypatch)
    [path] = (tmp_path / "tuning").glob("*.json")
    stored = json.loads(path.read_text())
    [(key, entry)] = stored["layers"].items()
    tuned_at_one_row = entry["choices"]["1"]
    entry["choices"]["1"] = [16, 48, 128, 4]  # a block shape the kernel cannot take (not a power of 2)
    path.write_text(json.dumps(stored))

    model = nn.Sequential(nn.Linear(64, 80))
    with caplog.at_level("WARNING", logger="starchat.model"):
        _, timed = _first_tuning(kernels, tuned_linear, model, monkeypatch, products=real_linear)
    assert "no longer computes the product" in caplog.text and timed > 0
    assert list(model[0].tuned[1]) == tuned_at_one_row
    assert json.loads(path.read_text())["layers"][key]["choices"]["1"] == tuned_at_one_row  # stored anew


def test_the_tuning_cache_follows_its_environment_and_switches(kernels, monkeypatch, tmp_path, caplog):
    """Another kernel source (or GPU, versions, launch mode) makes another file; an unreadable file
    is timed over; explicit candidates and STARCHAT_TUNING_CACHE=0 leave the cache alone."""
    from torch import nn

    from starchat.model import tuned_linear, tuning_cache

    _cache_on(monkeypatch, tmp_path)
    folder = tmp_path / "tuning"
    _first_tuning(kernels, tuned_linear, nn.Sequential(nn.Linear(64, 80)), monkeypatch)
    monkeypatch.setattr(tuning_cache, "_sources_hash", lambda: "edited kernels")
    _, timed = _first_tuning(kernels, tuned_linear, nn.Sequential(nn.Linear(64, 80)), monkeypatch)
    assert timed > 0 and len(list(folder.glob("*.json"))) == 2

    tuning_cache.TuningCache(torch.device("cpu"), torch.float32).path.write_text("{not json")  # this environment's
    with caplog.at_level("WARNING", logger="starchat.model"):
        _, timed = _first_tuning(kernels, tuned_linear, nn.Sequential(nn.Linear(64, 80)), monkeypatch)
    assert "unreadable" in caplog.text and timed > 0
    assert tuning_cache.TuningCache(torch.device("cpu"), torch.float32).get(
        tuning_cache.layer_key(torch.float32, 80, 64, True, False)) is not None  # written anew

    monkeypatch.setattr(tuning_cache, "_sources_hash", lambda: "other kernels still")
    tuned_linear.tune_decode_products(nn.Sequential(nn.Linear(64, 80)), torch.float32, candidates=((32, 128, 4),))
    monkeypatch.setenv("STARCHAT_TUNING_CACHE", "0")
    _first_tuning(kernels, tuned_linear, nn.Sequential(nn.Linear(64, 80)), monkeypatch)
    assert len(list(folder.glob("*.json"))) == 2
