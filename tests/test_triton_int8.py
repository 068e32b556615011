"""The GPU int8 kernel (model/triton_int8.py) run by Triton's interpreter on the CPU, against the
dequantized product in float64. On a GPU, tests/test_cuda.py runs it compiled.

Triton reads TRITON_INTERPRET when it is imported (its own library functions are decorated then),
so in an ordinary test run this module runs itself in a child pytest with the variable set.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from starchat.model.quant import quantize_per_channel

pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(INTERPRETED, reason="this is the child run")
def test_kernel_under_the_interpreter_in_a_child_process():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    # Every test ran in the child; only its copy of this launcher skips.
    assert re.search(r"\b\d+ passed", summary) and re.search(r"\b1 skipped", summary), summary


@pytest.fixture
def kernels():
    if not INTERPRETED:
        pytest.skip("runs in the child process (TRITON_INTERPRET=1)")
    from starchat.model import triton_int8

    return triton_int8


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
        out = kernels.int8_linear(x, weight, scales.to(dtype), with_bias)
        assert out.dtype == dtype and out.shape == (rows, 80)
        expected = reference(x, weight, scales.to(dtype), with_bias)
        # The kernel sums in float32; 16-bit outputs are rounded once at the end.
        tolerance = 1e-4 if dtype == torch.float32 else 1e-2
        assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def test_batched_shapes_and_rows_beyond_one_pass(kernels):
    weight, scales = quantize_per_channel(torch.randn(48, 64))
    x = torch.randn(2, 3, 64)
    out = kernels.int8_linear(x, weight, scales, None)
    assert out.shape == (2, 3, 48)
    assert torch.allclose(out.double(), reference(x.reshape(6, 64), weight, scales, None).reshape(2, 3, 48), rtol=1e-4, atol=1e-3)
    assert kernels.supports(torch.randn(kernels.ROWS_PER_PASS, 64))
    assert not kernels.supports(torch.randn(kernels.ROWS_PER_PASS + 1, 64))  # prefill chunks: cuBLAS
    assert not kernels.supports(torch.zeros(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="do not fit"):
        kernels.int8_linear(torch.randn(2, 63), weight, scales, None)


def test_without_the_interpreter_only_gpus_qualify(kernels, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not kernels.supports(torch.randn(2, 64))  # a CPU tensor
