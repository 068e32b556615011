"""Decode-only steps on a CPU run as one native call, ids to logits (starchat/model/cpu_decode.py).

Checked against the module path of the same model (and, through tests/test_engine_reference.py,
which decodes through this path, against HF transformers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from starchat import LLM, SamplingParams
from starchat.model import native
from starchat.model.attention import AttentionMetadata
from starchat.model.cpu_decode import FusedCpuDecode

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: CPU decoding uses the module path")

PROMPTS = ["def add(a, b):", "import os\n", "class Stack:\n    def push(self, item):", "x = [", "# sort a list of numbers"]


def _run(model_dir, dtype, fused: bool, quantize=None, prompts=PROMPTS, max_new_tokens=24):
    llm = LLM(str(model_dir), dtype=dtype, device="cpu", progress=False, quantize=quantize)
    model = llm.engine.runner.model
    assert isinstance(model.fused_decode, FusedCpuDecode)
    calls = []
    if fused:
        original = model.fused_decode.step.__func__
        model.fused_decode.__class__ = type("Counted", (FusedCpuDecode,), {
            "step": lambda self, token_ids, *args: calls.append(len(token_ids)) or original(self, token_ids, *args)})
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
    _assert_logprobs_close_until_divergence(fused, plain)


def _assert_logprobs_close_until_divergence(fused, plain, tolerance: float = 0.05) -> None:
    for a, b in zip(fused, plain):
        for step, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
            if x != y:
                break
            assert abs(a.logprobs[step].logprob - b.logprobs[step].logprob) < tolerance


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_fused_decode_of_many_sequences_on_amx_tiles(tiny_model_dir, quantize):
    """Where AMX tiles are granted, bfloat16 and int8 products of 8+ rows run on them in the fused
    step (and in the module path): 24 sequences decode there, tracking the module path as the
    16-bit test above does."""
    from starchat.model.cpu_linear import NATIVE_AMX_MIN_ROWS, native_amx_tiles

    if not native_amx_tiles():
        pytest.skip("no AMX tiles here (or they do not pay off): the native tiles run every product")
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(24)]
    fused, calls = _run(tiny_model_dir, "bfloat16", fused=True, quantize=quantize, prompts=prompts, max_new_tokens=6)
    plain, _ = _run(tiny_model_dir, "bfloat16", fused=False, quantize=quantize, prompts=prompts, max_new_tokens=6)
    assert max(calls) == 24 >= NATIVE_AMX_MIN_ROWS
    assert sum(a.token_ids[:3] == b.token_ids[:3] for a, b in zip(fused, plain)) >= len(prompts) - 2
    _assert_logprobs_close_until_divergence(fused, plain)


def test_float16_decode_on_amx_tiles_equals_the_float32_arithmetic(tiny_model_dir):
    """float16 weights on AMX tiles (two exact bfloat16 halves against activations kept to 16
    bits) decode 24 sequences together as the native float32 arithmetic does: the same tokens,
    log-probabilities within 1e-3 (bfloat16-rounded activations would move them by ~1e-2)."""
    from starchat.model.cpu_decode import attach_fused_decode
    from starchat.model.cpu_linear import NATIVE_AMX_MIN_ROWS_FLOAT16, PackedLinear, native_amx_tiles

    if not native_amx_tiles():
        pytest.skip("no AMX tiles here (or they do not pay off): the native tiles run every product")
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(24)]
    on, calls = _run(tiny_model_dir, "float16", fused=True, prompts=prompts, max_new_tokens=8)
    assert max(calls) == 24 >= NATIVE_AMX_MIN_ROWS_FLOAT16

    llm = LLM(str(tiny_model_dir), dtype="float16", device="cpu", progress=False)
    model = llm.engine.runner.model
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert layers and all(layer.amx_min_rows == NATIVE_AMX_MIN_ROWS_FLOAT16 for layer in layers)
    for layer in layers:
        layer.amx_min_rows = 0
    attach_fused_decode(model)  # the step's layer table takes the change
    off = llm.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=1))
    for a, b in zip(on, off):
        assert a.token_ids == b.token_ids
        assert all(abs(x.logprob - y.logprob) < 1e-3 for x, y in zip(a.logprobs, b.logprobs))


def test_fused_step_matches_module_forward_and_rejects_bad_input(tiny_model_dir):
    """One step called directly: the logits of the module path over the same cache, the new keys
    and values in the same slots; a token id or position out of range is an error that writes nothing."""
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False)
    runner = llm.engine.runner
    model, block_size = runner.model, runner.block_size
    torch.manual_seed(0)
    cache = torch.randn_like(runner.kv_cache)  # "earlier tokens" of both sequences
    tables = [[3, 1], [0]]  # sequence 0: positions 0-31 in blocks 3 then 1; sequence 1 in block 0
    token_ids, positions = [17, 5], [block_size + 4, 6]
    fused_cache = cache.clone()
    logits, greedy = model.fused_decode.step(token_ids, positions, tables, fused_cache, block_size)

    module_cache = cache.clone()
    lengths = torch.tensor(positions) + 1
    slots = [[t[p // block_size] * block_size + p % block_size for p in range(n)] for t, n in zip(tables, lengths.tolist())]
    gather = torch.tensor([row + [0] * (int(lengths.max()) - len(row)) for row in slots])
    mask = torch.where(torch.arange(gather.shape[1])[None, :] < lengths[:, None], 0.0, float("-inf"))
    metadata = AttentionMetadata(slot_mapping=torch.tensor([s[p] for s, p in zip(slots, positions)]), num_decode_tokens=2,
                                 decode_gather_slots=gather, decode_mask=mask[:, None, None, :], prefill_chunks=[])
    hidden = model(torch.tensor(token_ids), torch.tensor(positions), metadata, module_cache)
    expected = model.compute_logits(hidden)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy, logits.argmax(dim=-1))
    torch.testing.assert_close(fused_cache, module_cache, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fused_cache, cache)  # the new keys and values were written

    before = fused_cache.clone()
    for bad_ids, bad_positions, bad_tables in (([model.config.vocab_size, 5], positions, tables),
                                               ([17, -1], positions, tables),
                                               (token_ids, [model.config.n_positions, 6], tables),
                                               (token_ids, positions, [[3, 10**9], [0]])):
        with pytest.raises(ValueError, match="out of range"):
            model.fused_decode.step(bad_ids, bad_positions, bad_tables, fused_cache, block_size)
    assert torch.equal(fused_cache, before)


def test_steps_with_prefill_use_the_module_path(tiny_model_dir):
    """A request that joins mid-way shares steps with decodes: those steps take the module path
    (the fused step is called only for decode-only steps, never with the joining prompt)."""
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False)
    engine, fused = llm.engine, llm.engine.runner.model.fused_decode
    calls, original = [], fused.step
    fused.step = lambda token_ids, *args: calls.append(len(token_ids)) or original(token_ids, *args)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine.add_request("def add(a, b):", params, request_id="a")
    engine.step()  # prefill of a
    engine.step()  # decode of a alone: fused
    engine.add_request("import os\n", params, request_id="b")
    engine.step()  # a's decode with b's prefill: module path
    assert calls == [1]
    while engine.has_unfinished_requests():
        engine.step()
    assert 2 in calls  # then both decode together


def test_greedy_tokens_of_the_step_follow_numpy_argmax_on_ties_and_nan(tiny_model_dir):
    """The step's argmax: the first of equal maxima, and the first NaN if any (as the sampler's
    NumPy argmax, so greedy tokens do not depend on which path decoded them)."""
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False)
    runner = llm.engine.runner
    fused, head = runner.model.fused_decode, runner.model.lm_head.packed_weight.data  # (panels, K, 16)

    def step():
        return fused.step([5], [0], [[0]], runner.kv_cache.clone(), runner.block_size)

    logits, _ = step()
    top = int(logits[0].argmax())
    assert float(logits[0, top]) > 0
    weights = head[top // 16, :, top % 16].clone()
    for token in (7, 3):  # doubled top row: two equal, larger maxima
        head[token // 16, :, token % 16] = 2 * weights
    logits, greedy = step()
    assert logits[0, 3] == logits[0, 7] == logits[0].max()
    assert greedy.tolist() == [3]
    # (the step's argmax runs 16 lanes wide where it can: equal maxima in one lane, 35 after 19,
    # and across lanes, 20 before 35, give the first; the last row is past the vector part)
    for token in (19, 35, 20):
        head[token // 16, :, token % 16] = 3 * weights
    logits, greedy = step()
    assert greedy.tolist() == [19] == [int(np.argmax(logits.numpy()[0]))]
    last = runner.model.lm_head.out_features - 1
    head[last // 16, :, last % 16] = float("nan")
    logits, greedy = step()
    assert greedy.tolist() == [last] == [int(np.argmax(logits.numpy()[0]))]
    head[40 // 16, :, 40 % 16] = float("nan")
    logits, greedy = step()
    assert greedy.tolist() == [40] == [int(np.argmax(logits.numpy()[0]))]
