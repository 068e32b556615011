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
@pytest.mark.parametrize("rows,in_features", [(1, 200), (5, 200), (17, 200), (64, 200), (3, 2100)])
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
    assert kernels.supports(torch.randn(kernels.ROWS_PER_PASS, 64))
    assert not kernels.supports(torch.randn(kernels.ROWS_PER_PASS + 1, 64))  # prefill chunks: cuBLAS
    assert not kernels.supports(torch.zeros(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="do not fit"):
        kernels.linear(torch.randn(2, 63), weight, scales, None)


def test_without_the_interpreter_only_gpus_qualify(kernels, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not kernels.supports(torch.randn(2, 64))  # a CPU tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 16, 33])
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


def test_tuning_keeps_the_kernel_only_where_it_wins(kernels, monkeypatch):
    from torch import nn

    from starchat.model import tuned_linear
    from starchat.model.quant import Int8Linear

    model = nn.Sequential(nn.Linear(64, 80), nn.Linear(64, 80), nn.Linear(80, 48, bias=False),
                          Int8Linear.from_float(torch.randn(48, 80), torch.randn(48), torch.float32))

    def fake_timing(fn, device):  # the kernel wins at one row, loses at 16; block (32, 128, 4) is the fastest
        fake_timing.current = None
        fn()
        if fake_timing.current is None:  # cuBLAS ran
            return 100.0
        rows, blocks = fake_timing.current
        return (50.0 if rows == 1 else 150.0) - (10.0 if blocks[1:] == (32, 128, 4) else 0.0)

    real_linear = kernels.linear

    def recording_linear(x, weight, scales=None, bias=None, blocks=None):
        fake_timing.current = (x.shape[0], blocks)
        return real_linear(x, weight, scales, bias, blocks)

    monkeypatch.setattr(tuned_linear, "per_call_us", fake_timing)
    monkeypatch.setattr(kernels, "linear", recording_linear)
    report = tuned_linear.tune_decode_products(model, torch.float32, candidates=((16, 128, 4), (32, 128, 4)))
    monkeypatch.setattr(kernels, "linear", real_linear)
    assert len(report) == 6  # (64->80 with bias, 80->48 without, int8 80->48) x (1, 16 rows)
    assert all(type(module) is tuned_linear.TunedLinear for module in model[:3])  # same parameters, new forward
    assert model[0].tuned == model[1].tuned == {1: (16, 32, 128, 4), 16: None}
    assert model[3].tuned == {1: (16, 32, 128, 4), 16: (16, 32, 128, 4)}  # int8: no cuBLAS product to lose to

    calls = []
    monkeypatch.setattr(kernels, "linear", lambda *args: calls.append(args[-1]) or real_linear(*args))
    for rows in (1, 16, 40):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(model[0](x), x @ model[0].weight.T + model[0].bias, rtol=1e-5, atol=1e-5)
    assert calls == [(16, 32, 128, 4)]  # one row: the kernel; 16 and 40 rows: cuBLAS
    x = torch.randn(5, 80)
    expected = x.double() @ (model[3].weight.double() * model[3].scales.double()[:, None]).T + model[3].bias.double()
    assert torch.allclose(model[3](x).double(), expected, rtol=1e-4, atol=1e-3)
    assert calls[-1] == (16, 32, 128, 4)  # int8 at 5 rows: the 16-row bucket's tuned blocks


def test_tuning_with_real_timings_gives_right_products(kernels):
    from torch import nn

    from starchat.model import tuned_linear

    model = nn.Sequential(nn.Linear(96, 40))
    report = tuned_linear.tune_decode_products(model, torch.float32, candidates=((32, 128, 4),))
    assert {row["rows"] for row in report} == {1, 16} and all(row["kernel_us"] > 0 for row in report)
    x = torch.randn(1, 96)
    torch.testing.assert_close(model(x), x @ model[0].weight.T + model[0].bias, rtol=1e-5, atol=1e-5)
