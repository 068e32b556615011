"""The GPU decode-attention and add+LayerNorm kernels (model/triton_attention.py,
model/triton_layer_norm.py) run by Triton's interpreter on the CPU: each against a float64
reference, then inside the engine, whose greedy tokens must equal HF transformers'. On a GPU,
tests/test_cuda.py runs them compiled.

In an ordinary test run this module runs itself in a child pytest under the interpreter
(tests/triton_interpreter.py).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from test_engine_reference import PROMPTS, hf_greedy
from triton_interpreter import INTERPRETED, run_under_interpreter

pytest.importorskip("triton")


@pytest.mark.skipif(INTERPRETED, reason="this is the child run")
def test_kernels_under_the_interpreter_in_a_child_process():
    run_under_interpreter(__file__)


@pytest.fixture(autouse=True)
def child_only(request):
    if not INTERPRETED and request.node.name != "test_kernels_under_the_interpreter_in_a_child_process":
        pytest.skip("runs in the child process (TRITON_INTERPRET=1)")


# ---- decode attention ------------------------------------------------------------------------

def decode_case(lengths, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """Queries, new keys/values, a cache whose blocks are handed out in shuffled order, block tables."""
    generator = torch.Generator().manual_seed(seed)
    kv_dim = num_kv_heads * head_dim
    max_blocks = max(-(-n // block_size) for n in lengths)
    num_blocks = len(lengths) * max_blocks + 3
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = torch.tensor([order[i * max_blocks:(i + 1) * max_blocks] for i in range(len(lengths))])
    cache = torch.randn(2, num_blocks * block_size, kv_dim, generator=generator).to(dtype)
    qkv = torch.randn(len(lengths), num_heads * head_dim + 2 * kv_dim, generator=generator).to(dtype)
    query, key, value = qkv.split((num_heads * head_dim, kv_dim, kv_dim), dim=1)  # strided views, as in the model
    return query, key, value, cache, tables, torch.tensor(lengths)


def reference_decode(query, key, value, cache, tables, lengths, block_size, num_heads, num_kv_heads, scale):
    """Attention in float64 over the cache as it was, with each sequence's new key/value appended."""
    head_dim = query.shape[1] // num_heads
    group = num_heads // num_kv_heads
    out = []
    for row, length in enumerate(lengths.tolist()):
        slots = [tables[row, t // block_size].item() * block_size + t % block_size for t in range(length - 1)]
        keys = torch.cat([cache[0][slots], key[row:row + 1]]).double().view(length, num_kv_heads, head_dim)
        values = torch.cat([cache[1][slots], value[row:row + 1]]).double().view(length, num_kv_heads, head_dim)
        q = query[row].double().view(num_kv_heads, group, head_dim)
        probs = torch.softmax(torch.einsum("hgd,lhd->hgl", q, keys) * scale, dim=-1)
        out.append(torch.einsum("hgl,lhd->hgd", probs, values).reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(6, 1, 16), (4, 2, 24), (3, 3, 32)])
@pytest.mark.parametrize("programs_wanted", [1, 256])  # one program per sequence and head, or split contexts
def test_decode_attention_equals_reference_and_writes_the_new_token(dtype, num_heads, num_kv_heads, head_dim,
                                                                    programs_wanted, monkeypatch):
    from starchat.model import triton_attention

    monkeypatch.setattr(triton_attention, "PROGRAMS_WANTED", programs_wanted)
    block_size = 16
    # 1: only the new token; 64/65: a full tile and one past it; 150: three tiles, blocks scattered
    lengths = [1, 64, 65, 150, 37]
    query, key, value, cache, tables, lengths_t = decode_case(lengths, num_heads, num_kv_heads, head_dim, block_size, dtype)
    scale = 1 / math.sqrt(head_dim)
    expected = reference_decode(query, key, value, cache, tables, lengths_t, block_size, num_heads, num_kv_heads, scale)
    before = cache.clone()
    max_context = 160  # a bucket above the longest sequence, as a CUDA graph passes
    if programs_wanted > 1:
        assert triton_attention.split_count(len(lengths), num_kv_heads, max_context) > 1
    out = triton_attention.decode_attention(query, key, value, cache, tables, lengths_t, max_context, block_size,
                                            num_heads, num_kv_heads, scale)
    tolerance = 2e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)
    new_slots = [tables[row, (n - 1) // block_size].item() * block_size + (n - 1) % block_size
                 for row, n in enumerate(lengths)]
    assert torch.equal(cache[0][new_slots], key) and torch.equal(cache[1][new_slots], value)
    untouched = torch.ones(cache.shape[1], dtype=torch.bool)
    untouched[new_slots] = False
    assert torch.equal(cache[:, untouched], before[:, untouched])


def test_decode_rows_of_one_sequence_see_each_other():
    """A speculative decode's rows (its last token, then each draft at the next position, on one
    block table) in one launch: every row attends to the rows before it, whatever order the
    programs run in. The rows are given here in shuffled order, so a row that read a slot
    before another row's program wrote it would read the stale value left in the cache."""
    from starchat.model import triton_attention
    from starchat.model.attention import AttentionMetadata, paged_attention

    num_heads, num_kv_heads, head_dim, block_size = 6, 1, 16, 16
    kv_dim, cached, verified = num_kv_heads * head_dim, 70, 4
    # Sequence 0: 70 cached tokens and 4 verified positions (70..73); sequence 1: a plain decode at 20.
    query, key, value, cache, tables, _ = decode_case([cached + verified, 21], num_heads, num_kv_heads, head_dim,
                                                      block_size, torch.float32, seed=4)
    rows = [(0, cached + 3), (1, 20), (0, cached + 1), (0, cached), (0, cached + 2)]  # (sequence, position)
    generator = torch.Generator().manual_seed(5)
    qkv = torch.randn(len(rows), num_heads * head_dim + 2 * kv_dim, generator=generator)
    query, key, value = qkv.split((num_heads * head_dim, kv_dim, kv_dim), dim=1)
    slots = [tables[seq, pos // block_size].item() * block_size + pos % block_size for seq, pos in rows]
    before = cache.clone()
    metadata = AttentionMetadata(slot_mapping=torch.tensor(slots), num_decode_tokens=len(rows), prefill_chunks=[],
                                 block_size=block_size, decode_block_tables=tables[[seq for seq, _ in rows]],
                                 decode_context_lens=torch.tensor([pos + 1 for _, pos in rows]),
                                 decode_max_context=96, decode_rows_share_sequences=True)
    scale = 1 / math.sqrt(head_dim)
    assert triton_attention.supports(query.device, query.dtype)
    out = paged_attention(query, key, value, cache, metadata, num_heads, num_kv_heads, scale)

    # Reference in float64: each position's key/value from the row that computes it, else the cache.
    expected = []
    for seq, pos in rows:
        keys, values = [], []
        for t in range(pos + 1):
            row = next((i for i, r in enumerate(rows) if r == (seq, t)), None)
            slot = tables[seq, t // block_size].item() * block_size + t % block_size
            keys.append(key[row] if row is not None else before[0][slot])
            values.append(value[row] if row is not None else before[1][slot])
        q = query[rows.index((seq, pos))].double().view(num_kv_heads, -1, head_dim)
        k = torch.stack(keys).double().view(-1, num_kv_heads, head_dim)
        v = torch.stack(values).double().view(-1, num_kv_heads, head_dim)
        probs = torch.softmax(torch.einsum("hgd,lhd->hgl", q, k) * scale, dim=-1)
        expected.append(torch.einsum("hgl,lhd->hgd", probs, v).reshape(-1))
    torch.testing.assert_close(out.double(), torch.stack(expected), rtol=2e-5, atol=2e-5)
    assert torch.equal(cache[0][slots], key) and torch.equal(cache[1][slots], value)
    untouched = torch.ones(cache.shape[1], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(cache[:, untouched], before[:, untouched])


# ---- add + LayerNorm -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("width", [64, 200])
def test_add_layer_norm_equals_pytorch(dtype, width):
    from starchat.model import triton_layer_norm

    generator = torch.Generator().manual_seed(width)
    hidden = (torch.randn(5, width, generator=generator) * 3 + 1).to(dtype)
    delta = torch.randn(5, width, generator=generator).to(dtype)
    weight, bias = torch.randn(width, generator=generator), torch.randn(width, generator=generator)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    summed, normed = triton_layer_norm.add_layer_norm(hidden, delta, weight.to(dtype), bias.to(dtype), 1e-5)
    assert torch.equal(summed, hidden + delta)  # the sum is stored exactly as the separate add would store it
    expected = torch.nn.functional.layer_norm((hidden + delta).double(), (width,), weight.to(dtype).double(),
                                              bias.to(dtype).double(), 1e-5)
    torch.testing.assert_close(normed.double(), expected, rtol=tolerance, atol=tolerance)
    same, normed_alone = triton_layer_norm.add_layer_norm(hidden, None, weight.to(dtype), bias.to(dtype), 1e-5)
    assert same is hidden
    expected = torch.nn.functional.layer_norm(hidden.double(), (width,), weight.to(dtype).double(),
                                              bias.to(dtype).double(), 1e-5)
    torch.testing.assert_close(normed_alone.double(), expected, rtol=tolerance, atol=tolerance)


# ---- in the engine ---------------------------------------------------------------------------

@pytest.mark.parametrize("static_decode", [False, True])
@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_mha_model_dir"])
def test_engine_with_the_kernels_gives_hf_greedy_tokens(model_fixture, static_decode, request, monkeypatch):
    from transformers import GPTBigCodeForCausalLM as HFModel

    from starchat import LLM, SamplingParams
    from starchat.model import triton_attention, triton_layer_norm, triton_linear, tuned_linear

    calls = {"attention": 0, "norm": 0, "product+gelu": 0}

    def counted(function, name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(triton_attention, "decode_attention", counted(triton_attention.decode_attention, "attention"))
    monkeypatch.setattr(triton_layer_norm, "add_layer_norm", counted(triton_layer_norm.add_layer_norm, "norm"))
    real_linear = triton_linear.linear

    def counted_linear(*args, gelu_tanh=False, **kwargs):
        calls["product+gelu"] += gelu_tanh
        return real_linear(*args, gelu_tanh=gelu_tanh, **kwargs)

    monkeypatch.setattr(triton_linear, "linear", counted_linear)
    path = request.getfixturevalue(model_fixture)
    llm = LLM(str(path), dtype="float32", device="cpu", progress=False, max_num_seqs=4)
    runner = llm.engine.runner
    assert runner.decode_kernel_reads_tables  # the Triton kernel, not the CPU one, reads the cache
    runner.model.fused_decode = None  # every step through the module forward, where the kernels sit
    reference = HFModel.from_pretrained(path, dtype=torch.float32).eval()
    # As on a GPU: each MLP's GELU in its first product's epilogue, the Triton kernel for decode
    # rows. (On a CPU the loader packs the Linears for the native kernels; c_fc goes back to a
    # plain nn.Linear, HF's, for this.)
    for block, reference_block in zip(runner.model.transformer.h, reference.transformer.h):
        block.mlp.c_fc = copy.deepcopy(reference_block.mlp.c_fc)
    tanh_gelu = reference.config.activation_function != "gelu"  # the MHA checkpoint has the exact GELU: not fused
    num_layers = len(runner.model.transformer.h)
    assert tuned_linear.fuse_gelu_into_products(runner.model, torch.float32) == (num_layers if tanh_gelu else 0)
    for block in runner.model.transformer.h:
        block.mlp.c_fc.tuned = {1: (16, 32, 32, 4), 16: (16, 32, 32, 4)}
    if static_decode:  # the fixed-shape step that CUDA graphs replay (padding rows, context buckets)
        runner.enable_static_decode(max_batch=4, max_context=llm.engine.max_model_len, capture=False)
    prompt_ids = [llm.tokenizer.encode(prompt) for prompt in PROMPTS]
    new_tokens = 20  # the longest prompt crosses a 64-token tile: two context splits
    completions = llm.generate(prompt_ids, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    assert [c.token_ids for c in completions] == [hf_greedy(reference, ids, new_tokens) for ids in prompt_ids]
    assert calls["attention"] >= (new_tokens - 1) * num_layers  # every decode step, every layer
    assert calls["norm"] >= new_tokens * (2 * num_layers + 1)
    if tanh_gelu:
        assert calls["product+gelu"] >= (new_tokens - 1) * num_layers
    else:
        assert calls["product+gelu"] == 0


@pytest.mark.parametrize("static_decode", [False, True])
def test_speculative_decoding_with_the_kernels_gives_hf_greedy_tokens(tiny_model_dir, static_decode):
    """Verify steps as on a GPU: the drafts are decode rows of the Triton kernel, eagerly or in the
    fixed-shape step that verify CUDA graphs replay."""
    from transformers import GPTBigCodeForCausalLM as HFModel

    from starchat import LLM, SamplingParams

    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False, max_num_seqs=4,
              num_speculative_tokens=3)
    runner = llm.engine.runner
    assert runner.decode_kernel_reads_tables
    runner.model.fused_decode = None
    if static_decode:
        runner.enable_static_decode(max_batch=16, max_context=llm.engine.max_model_len, capture=False)
    reference = HFModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = ["x = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,", "def f():\n    return 1\n\ndef f():\n"]
    prompt_ids = [llm.tokenizer.encode(prompt) for prompt in prompts]
    completions = llm.generate(prompt_ids, SamplingParams(max_new_tokens=16, ignore_eos=True))
    assert [c.token_ids for c in completions] == [hf_greedy(reference, ids, 16) for ids in prompt_ids]
    assert llm.engine.stats().spec_decode_accepted_tokens > 0
    if static_decode:
        assert any(shared for _, _, shared in runner.decode_graphs.steps)


def test_a_failing_kernel_turns_the_kernels_off_and_the_engine_stays_right(tiny_model_dir, monkeypatch, caplog):
    """The load-time check: a Triton build that rejects or miscompiles a kernel costs speed only."""
    from transformers import GPTBigCodeForCausalLM as HFModel

    from starchat import LLM, SamplingParams
    from starchat.model import triton_attention, triton_support

    monkeypatch.setattr(triton_support, "ENABLED", True)
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False)
    assert llm.engine.runner.decode_kernel_reads_tables and triton_support.ENABLED  # the check passed

    real = triton_attention.decode_attention
    monkeypatch.setattr(triton_attention, "decode_attention", lambda *args: real(*args) * 1.01)  # slightly wrong
    with caplog.at_level("WARNING"):
        llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False)
    assert not llm.engine.runner.decode_kernel_reads_tables and not triton_support.ENABLED
    assert "wrong results from decode attention" in caplog.text
    llm.engine.runner.model.fused_decode = None  # the module forward: the PyTorch path now
    reference = HFModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = llm.tokenizer.encode(PROMPTS[0])
    completion = llm.generate([ids], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    assert completion.token_ids == hf_greedy(reference, ids, 8)
