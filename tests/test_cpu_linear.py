"""Linear layers on a CPU pick their kernel by row count (starchat/model/cpu_linear.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from starchat import LLM, SamplingParams
from starchat.model import native
from starchat.model.cpu_linear import ROWS_FOR_FLOAT32, CpuLinear, native_row_limit, prepare_cpu_linears, \
    wants_float32_for_many_rows
from starchat.model.quant import Int8Linear


def _layer(dtype: torch.dtype) -> CpuLinear:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).to(dtype)
    prepare_cpu_linears(model)
    return model[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rows_pick_the_path(dtype, monkeypatch):
    layer = _layer(dtype)
    assert type(layer) is CpuLinear and layer.native_rows == native_row_limit(dtype)
    calls = []
    monkeypatch.setattr(native, "linear", lambda *args: calls.append(args[0].shape) or torch.zeros(1))
    layer(torch.randn(layer.native_rows, 64).to(dtype))
    assert calls == ([(layer.native_rows, 64)] if native.available() else [])
    calls.clear()
    many = torch.randn(3, max(layer.native_rows, ROWS_FOR_FLOAT32), 64).to(dtype)  # rows counted over leading dims
    out = layer(many)
    assert not calls
    if wants_float32_for_many_rows(torch.device("cpu"), dtype):
        expected = nn.functional.linear(many.float(), layer.weight.float(), layer.bias.float()).to(dtype)
    else:
        expected = nn.functional.linear(many, layer.weight, layer.bias)
    assert out.dtype == dtype and torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_paths_agree(dtype):
    layer = _layer(dtype)
    x = torch.randn(5, 64)
    few = torch.cat([layer(row[None].to(dtype)) for row in x])
    reference = nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert (few.double() - reference).abs().max() / reference.abs().max() < tolerance


def test_loader_prepares_every_cpu_model(tiny_model_dir):
    for dtype in ("float32", "float16"):
        model = LLM(str(tiny_model_dir), dtype=dtype, device="cpu", progress=False).engine.runner.model
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert linears and all(type(m) is CpuLinear for m in linears)
    quantized = LLM(str(tiny_model_dir), dtype="bfloat16", device="cpu", progress=False, quantize="int8").engine.runner.model
    assert all(isinstance(m, Int8Linear) for m in (quantized.lm_head, quantized.transformer.h[0].mlp.c_fc))


def test_kernels_do_not_change_greedy_tokens(tiny_model_dir, monkeypatch):
    """float32 greedy decoding with the native kernels equals decoding with PyTorch's alone."""
    prompts = ["def add(a, b):", "import os\n", "class Stack:", "x = [", "# sort a list"]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    with_kernels = [c.token_ids for c in LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False).generate(prompts, params)]
    monkeypatch.setattr(native, "available", lambda: False)
    without = [c.token_ids for c in LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False).generate(prompts, params)]
    assert with_kernels == without


def test_float16_batched_decoding_tracks_float32(tiny_model_dir):
    prompts = ["def add(a, b):", "import os\n", "class Stack:", "x = [", "# sort a list", "for i in range(",
               "while True:", "print(", "return"]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    half = [c.token_ids for c in LLM(str(tiny_model_dir), dtype="float16", device="cpu", progress=False).generate(prompts, params)]
    full = [c.token_ids for c in LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False).generate(prompts, params)]
    first_tokens_equal = sum(h[0] == f[0] for h, f in zip(half, full))
    assert first_tokens_equal >= len(prompts) - 1  # 16-bit weights: at most one near-tie flips
