"""Prompt attention on AMX tiles through the engine (native/prompt_attention.c, attention.py):
every prefill chunk of a step in one native call, against HF transformers' float32 model.

The checkpoint has 32-wide heads (the tiles take multiples of 32; the shared tiny checkpoint's
16-wide heads stay on SDPA), four query heads per KV head. Skipped where the CPU has no AMX."""

from __future__ import annotations

import pytest
import torch

from reference_checkpoints import hf_greedy, write_hf_checkpoint
from starchat.llm import LLM
from starchat.model import native
from starchat.model.attention import PromptAttention
from starchat.model.gpt_bigcode import Attention
from starchat.sampling_params import SamplingParams
from test_engine_reference import PROMPTS, our_prompt_logits

pytestmark = pytest.mark.skipif(not native.available() or not native.amx_init(),
                                reason="no AMX tiles on this CPU (or no C compiler)")

# Long enough that 64-token prefill steps leave later chunks with cached context (read through
# the cache's slots) and mix them with other sequences' decodes.
LONG_PROMPTS = [PROMPTS[0] * 12, PROMPTS[1] * 3, PROMPTS[3] * 2, PROMPTS[2]]


@pytest.fixture(scope="module")
def wide_heads_dir(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("wide-heads"), seed=4, n_embd=128, n_head=4)


def _hf_float32(model_dir, dtype: torch.dtype):
    """HF's float32 model over the checkpoint's weights rounded to `dtype` (what ours holds)."""
    from transformers import GPTBigCodeForCausalLM

    reference = GPTBigCodeForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(parameter.to(dtype).float())
    return reference


def _count_tile_calls(monkeypatch) -> list[int]:
    """Chunks per native prompt-attention call that ran on the tiles."""
    calls, real = [], native.prompt_attention

    def spy(query, out, chunks, *args):
        done = real(query, out, chunks, *args)
        if done:
            calls.append(len(chunks))
        return done

    monkeypatch.setattr(native, "prompt_attention", spy)
    return calls


def test_a_float16_model_attends_on_split_tiles_as_hf_float32(wide_heads_dir, monkeypatch):
    # float16 weights: products and prompt attention keep 16 bits of every activation, so prompt
    # logits stay within 5e-5 of the largest of HF's float32 over the same weights, and greedy
    # decoding (prefill split into 64-token steps beside other sequences' decodes) gives its tokens.
    calls = _count_tile_calls(monkeypatch)
    llm = LLM(str(wide_heads_dir), dtype="float16", progress=False, enable_prefix_caching=False,
              max_num_batched_tokens=64)
    attentions = [m for m in llm.engine.runner.model.modules() if isinstance(m, Attention)]
    assert attentions and all(m.prompt_attention == PromptAttention(None, True, True) for m in attentions)
    reference = _hf_float32(wide_heads_dir, torch.float16)
    for prompt in LONG_PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0]
        actual = our_prompt_logits(llm, ids)
        assert (actual - expected).abs().max().item() < 5e-5 * expected.abs().max().item()
    assert calls, "the tiles never ran"
    calls.clear()
    completions = llm.generate(LONG_PROMPTS, SamplingParams(max_new_tokens=24, ignore_eos=True))
    for prompt, completion in zip(LONG_PROMPTS, completions):
        assert completion.token_ids == hf_greedy(reference, llm.tokenizer.encode(prompt), 24), prompt[:30]
    assert max(calls) > 1  # chunks of several sequences in one call


def test_a_bfloat16_model_attends_on_tiles_close_to_sdpa(wide_heads_dir, monkeypatch):
    # bfloat16 weights: the tiles round queries, keys, values and weights to bfloat16 as bfloat16
    # SDPA does; prompt logits within 1% of the largest of HF's float32 (bfloat16 SDPA: 0.3% here;
    # test_engine_reference holds bfloat16 to 3%), the same first greedy token as SDPA's on all but
    # one prompt.
    calls = _count_tile_calls(monkeypatch)
    llm = LLM(str(wide_heads_dir), dtype="bfloat16", progress=False, enable_prefix_caching=False,
              max_num_batched_tokens=64)
    attentions = [m for m in llm.engine.runner.model.modules() if isinstance(m, Attention)]
    assert all(m.prompt_attention.amx_tiles and not m.prompt_attention.split for m in attentions)
    reference = _hf_float32(wide_heads_dir, torch.bfloat16)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    tiles = llm.generate(LONG_PROMPTS, params)
    for prompt in LONG_PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0]
        assert (our_prompt_logits(llm, ids) - expected).abs().max().item() < 0.01 * expected.abs().max().item()
    assert calls
    for module in attentions:
        module.prompt_attention = PromptAttention(module.prompt_attention.dtype)  # SDPA per chunk
    calls.clear()
    sdpa = llm.generate(LONG_PROMPTS, params)
    assert not calls
    assert sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(tiles, sdpa)) >= len(LONG_PROMPTS) - 1


def test_an_int8_model_attends_on_bfloat16_tiles(wide_heads_dir, monkeypatch):
    # int8 weights with bfloat16 activations: the tiles in their bfloat16 mode; prompt logits
    # within 1% of the largest of the same model's bfloat16 SDPA (0.3% here), and within 3% of HF's
    # float32 over the unquantized weights (the quantization's own error: about 1.2% here).
    calls = _count_tile_calls(monkeypatch)
    llm = LLM(str(wide_heads_dir), dtype="bfloat16", quantize="int8", progress=False, enable_prefix_caching=False)
    attentions = [m for m in llm.engine.runner.model.modules() if isinstance(m, Attention)]
    assert all(m.prompt_attention.amx_tiles and not m.prompt_attention.split for m in attentions)
    reference = _hf_float32(wide_heads_dir, torch.float32)
    for prompt in LONG_PROMPTS[:3]:
        ids = llm.tokenizer.encode(prompt)
        tiles = our_prompt_logits(llm, ids)
        for module in attentions:
            module.prompt_attention = PromptAttention(torch.bfloat16)
        sdpa = our_prompt_logits(llm, ids)
        for module in attentions:
            module.prompt_attention = PromptAttention(torch.bfloat16, amx_tiles=True)
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0]
        assert (tiles - sdpa).abs().max().item() < 0.01 * sdpa.abs().max().item()
        assert (tiles - expected).abs().max().item() < 0.03 * expected.abs().max().item()
    assert calls
