"""Decode-only steps on a CPU run each block as one native call (starchat/model/cpu_decode.py).

Checked against the module path of the same model (and, through tests/test_engine_reference.py,
which decodes through this path, against HF transformers)."""

from __future__ import annotations

import pytest
import torch

from starchat import LLM, SamplingParams
from starchat.model import native
from starchat.model.cpu_decode import FusedCpuDecode

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: CPU decoding uses the module path")

PROMPTS = ["def add(a, b):", "import os\n", "class Stack:\n    def push(self, item):", "x = [", "# sort a list of numbers"]


def _run(model_dir, dtype, fused: bool, quantize=None, prompts=PROMPTS, max_new_tokens=24):
    llm = LLM(str(model_dir), dtype=dtype, device="cpu", progress=False, quantize=quantize)
    model = llm.engine.runner.model
    assert isinstance(model.fused_decode, FusedCpuDecode)
    calls = []
    if fused:
        original = model.fused_decode.__call__.__func__
        model.fused_decode.__class__ = type("Counted", (FusedCpuDecode,), {
            "__call__": lambda self, *args: calls.append(args[0].shape[0]) or original(self, *args)})
    else:
        model.fused_decode = None
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, logprobs=1)
    completions = llm.generate(prompts, params)
    return completions, calls


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_mha_model_dir"])  # multi-query/tanh, multi-head/erf
def test_fused_decode_matches_module_path_in_float32(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    fused, calls = _run(model_dir, "float32", fused=True)
    plain, _ = _run(model_dir, "float32", fused=False)
    assert calls and max(calls) == len(PROMPTS)  # decode steps of all five sequences took the fused path
    for a, b in zip(fused, plain):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x.logprob - y.logprob) < 1e-4


def test_fused_decode_of_many_sequences_matches_module_path(tiny_model_dir):
    """40 sequences decode together: tiles of six rows and a partial one in every product."""
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(40)]
    fused, calls = _run(tiny_model_dir, "float32", fused=True, prompts=prompts, max_new_tokens=6)
    plain, _ = _run(tiny_model_dir, "float32", fused=False, prompts=prompts, max_new_tokens=6)
    assert max(calls) == 40
    for a, b in zip(fused, plain):
        assert a.token_ids == b.token_ids
        assert all(abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(a.logprobs, b.logprobs))


@pytest.mark.parametrize("dtype, quantize", [("float16", None), ("bfloat16", None), ("bfloat16", "int8")])
def test_fused_decode_tracks_module_path_in_16_bit(tiny_model_dir, dtype, quantize):
    fused, calls = _run(tiny_model_dir, dtype, fused=True, quantize=quantize)
    plain, _ = _run(tiny_model_dir, dtype, fused=False, quantize=quantize)
    assert calls
    # The fused path keeps the residual stream in float32, the module path in 16 bits: the first
    # tokens agree, and the chosen tokens' log-probabilities stay close until the paths diverge.
    assert sum(a.token_ids[:4] == b.token_ids[:4] for a, b in zip(fused, plain)) >= len(PROMPTS) - 1
    for a, b in zip(fused, plain):
        for step, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
            if x != y:
                break
            assert abs(a.logprobs[step].logprob - b.logprobs[step].logprob) < 0.05


def test_steps_with_prefill_use_the_module_path(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False)
    fused = llm.engine.runner.model.fused_decode
    from starchat.model.attention import AttentionMetadata, PrefillChunk

    decode_only = AttentionMetadata(torch.zeros(2, dtype=torch.long), 2, None, None, [])
    mixed = AttentionMetadata(torch.zeros(3, dtype=torch.long), 2, None, None, [PrefillChunk(2, 1, 0, None)])
    assert fused.applies(decode_only, 2)
    assert not fused.applies(mixed, 3)
    # Any number of decodes: the packed products take any row count.
    assert fused.applies(AttentionMetadata(torch.zeros(99, dtype=torch.long), 99, None, None, []), 99)
