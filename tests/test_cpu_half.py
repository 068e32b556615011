"""16-bit weights on CPU: many-row products in float32, one-row products in 16 bits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from starchat import LLM, SamplingParams
from starchat.model.cpu_half import ROWS_FOR_FLOAT32, ManyRowsInFloat32Linear, wants_float32_for_many_rows

pytestmark = pytest.mark.skipif(not wants_float32_for_many_rows(torch.device("cpu"), torch.float16),
                                reason="this CPU multiplies 16-bit matrices natively")


def test_rows_pick_the_path():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32).half()
    layer.__class__ = ManyRowsInFloat32Linear
    reference = nn.functional.linear
    few = torch.randn(ROWS_FOR_FLOAT32 - 1, 64).half()
    many = torch.randn(3, ROWS_FOR_FLOAT32, 64).half()  # rows counted over leading dimensions
    assert torch.equal(layer(few), reference(few, layer.weight, layer.bias))
    expected = reference(many.float(), layer.weight.float(), layer.bias.float()).half()
    assert layer(many).dtype == torch.float16 and torch.equal(layer(many), expected)


def test_loader_applies_it_to_16_bit_cpu_models_only(tiny_model_dir):
    half = LLM(str(tiny_model_dir), dtype="float16", device="cpu", progress=False).engine.runner.model
    full = LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False).engine.runner.model
    linears = [m for m in half.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is ManyRowsInFloat32Linear for m in linears)
    assert all(type(m) is nn.Linear for m in full.modules() if isinstance(m, nn.Linear))


def test_float16_batched_decoding_tracks_float32(tiny_model_dir):
    prompts = ["def add(a, b):", "import os\n", "class Stack:", "x = [", "# sort a list", "for i in range(",
               "while True:", "print(", "return"]  # 9 sequences: decode steps take the float32 path
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    half = [c.token_ids for c in LLM(str(tiny_model_dir), dtype="float16", device="cpu", progress=False).generate(prompts, params)]
    full = [c.token_ids for c in LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False).generate(prompts, params)]
    first_tokens_equal = sum(h[0] == f[0] for h, f in zip(half, full))
    assert first_tokens_equal >= len(prompts) - 1  # 16-bit weights: at most one near-tie flips
