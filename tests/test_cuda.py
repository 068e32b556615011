"""The CUDA path against the CPU float32 path (itself checked against HF transformers).

These run only where a CUDA GPU is visible (CI has none; a lent GPU machine runs them with
`python3 -m pytest -q tests/test_cuda.py`). Elsewhere they are skipped, by design.
"""

from __future__ import annotations

import pytest
import torch

from reference_checkpoints import write_hf_checkpoint
from starchat import LLM, SamplingParams
from starchat.model import AttentionMetadata, PrefillChunk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [
    "def fibonacci(n):",
    "import numpy as np\n\nclass Matrix:\n    def __init__(self, rows, cols):\n        self.rows = rows\n",
    "x",
    "# Sort a list of dictionaries by the value of one key, in place, with a stable sort " * 4,
]
NEW_TOKENS = 32
# bfloat16 keeps 8 bits of mantissa: over a few layers logits drift by about a percent of their range.
BF16_LOGIT_TOLERANCE = 0.03  # max |bf16 - fp32| / max |fp32|


@pytest.fixture(scope="module", params=["mqa", "mha"])
def checkpoint(request, tmp_path_factory):
    settings = dict(multi_query=True) if request.param == "mqa" else dict(multi_query=False, activation_function="gelu")
    return write_hf_checkpoint(tmp_path_factory.mktemp(request.param), seed=11, **settings)


def greedy(llm: LLM, prompts: list[str]) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return [completion.token_ids for completion in llm.generate(prompts, params)]


def prompt_logits(llm: LLM, prompt_ids: list[int]) -> torch.Tensor:
    runner = llm.engine.runner
    n, device = len(prompt_ids), runner.device
    metadata = AttentionMetadata(slot_mapping=torch.arange(n, device=device), num_decode_tokens=0,
                                 prefill_chunks=[PrefillChunk(0, n, 0, None)])
    hidden = runner.model(torch.tensor(prompt_ids, device=device), torch.arange(n, device=device), metadata, runner.kv_cache)
    return runner.model.compute_logits(hidden).cpu()


def test_float32_greedy_tokens_equal_cpu(checkpoint):
    cpu = greedy(LLM(str(checkpoint), dtype="float32", device="cpu", progress=False), PROMPTS)
    gpu_llm = LLM(str(checkpoint), dtype="float32", device="cuda", progress=False)
    from starchat.model import triton_attention

    # On Ampere or newer with Triton, the decode steps below run the Triton kernels.
    assert gpu_llm.engine.runner.decode_kernel_reads_tables == triton_attention.supports(torch.device("cuda"), torch.float32)
    assert greedy(gpu_llm, PROMPTS) == cpu  # batched together
    assert [greedy(gpu_llm, [prompt])[0] for prompt in PROMPTS] == cpu  # one at a time


def test_bfloat16_logits_within_tolerance(checkpoint):
    reference = LLM(str(checkpoint), dtype="float32", device="cpu", progress=False)
    bf16 = LLM(str(checkpoint), dtype="bfloat16", device="cuda", progress=False)
    for prompt in PROMPTS:
        ids = reference.tokenizer.encode(prompt)
        expected = prompt_logits(reference, ids)
        actual = prompt_logits(bf16, ids)
        drift = ((actual - expected).abs().max() / expected.abs().max()).item()
        print(f"bf16 logit drift {drift:.4f} on a {len(ids)}-token prompt")
        assert drift < BF16_LOGIT_TOLERANCE


def test_seeded_sampling_repeats_on_gpu(checkpoint):
    llm = LLM(str(checkpoint), dtype="bfloat16", device="cuda", progress=False)
    params = SamplingParams(max_new_tokens=24, do_sample=True, temperature=0.9, top_p=0.9, top_k=50, seed=5, ignore_eos=True)
    first = llm.generate(PROMPTS, params)
    second = llm.generate(PROMPTS[:1], params)
    assert first[0].token_ids == second[0].token_ids


def test_cuda_graph_and_eager_tokens_equal(checkpoint):
    for dtype in ("float32", "bfloat16"):
        eager = LLM(str(checkpoint), dtype=dtype, device="cuda", progress=False, cuda_graphs=False)
        graphs = LLM(str(checkpoint), dtype=dtype, device="cuda", progress=False)
        assert eager.engine.runner.decode_graphs is None
        assert greedy(graphs, PROMPTS) == greedy(eager, PROMPTS), dtype
        if dtype == "bfloat16":  # 16-bit models time each Linear shape's kernel against cuBLAS at load
            from starchat.model import triton_attention

            tuned = graphs.engine.runner.decode_products
            assert bool(tuned) == triton_attention.supports(torch.device("cuda"), torch.bfloat16)
            assert all(row["kernel_us"] > 0 and row["cublas_us"] > 0 for row in tuned)
        captured = graphs.engine.runner.decode_graphs.steps.values()
        assert captured and all(step.graph is not None for step in captured)


def test_int8_gpu_kernel_equals_dequantized_product():
    from starchat.model import triton_linear

    x = torch.randn(1, 384, dtype=torch.bfloat16, device="cuda")
    if triton_linear.triton is None or not triton_linear.supports(x):
        pytest.skip("no Triton, or a GPU older than Ampere: int8 products dequantize")
    from starchat.model.quant import quantize_per_channel

    weight, scales = quantize_per_channel(torch.randn(6400, 384))
    weight, scales = weight.cuda(), scales.cuda()
    bias = torch.randn(6400, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (1, 8, 33, triton_linear.ROWS_PER_PASS):
            x = torch.randn(rows, 384, device="cuda").to(dtype)
            out = triton_linear.linear(x, weight, scales.to(dtype), bias.to(dtype))
            expected = x.double() @ (weight.double() * scales.to(dtype).double()[:, None]).T + bias.to(dtype).double()
            tolerance = 1e-4 if dtype == torch.float32 else 1e-2
            assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def test_int8_greedy_tokens_equal_cpu_int8(checkpoint):
    cpu = greedy(LLM(str(checkpoint), dtype="float32", device="cpu", quantize="int8", progress=False), PROMPTS)
    gpu = greedy(LLM(str(checkpoint), dtype="float32", device="cuda", quantize="int8", progress=False), PROMPTS)
    assert gpu == cpu


def test_triton_decode_attention_and_norm_on_gpu():
    """The kernels compiled (tests/test_triton_kernels.py runs them interpreted, without bfloat16)."""
    import math

    from starchat.model import triton_attention, triton_layer_norm
    from test_triton_kernels import decode_case, reference_decode

    if not triton_attention.supports(torch.device("cuda"), torch.bfloat16):
        pytest.skip("no Triton, or a GPU older than Ampere: the PyTorch path runs")
    for dtype, tolerance in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
        for num_heads, num_kv_heads, head_dim in ((48, 1, 128), (4, 2, 24), (12, 12, 64)):
            for lengths, max_context in (([1, 64, 65, 300, 37], 320), ([2000], 2048), ([130] * 40, 256)):
                case = decode_case(lengths, num_heads, num_kv_heads, head_dim, 16, dtype)
                query, key, value, cache, tables, lengths_t = (t.cuda() for t in case)
                scale = 1 / math.sqrt(head_dim)
                expected = reference_decode(*(t.cpu() for t in (query, key, value, cache, tables, lengths_t)), 16,
                                            num_heads, num_kv_heads, scale)
                out = triton_attention.decode_attention(query, key, value, cache, tables, lengths_t, max_context, 16,
                                                        num_heads, num_kv_heads, scale)
                torch.testing.assert_close(out.double().cpu(), expected, rtol=tolerance, atol=tolerance)
        hidden = torch.randn(7, 6144, device="cuda").to(dtype)
        delta = torch.randn(7, 6144, device="cuda").to(dtype)
        weight, bias = torch.randn(6144, device="cuda").to(dtype), torch.randn(6144, device="cuda").to(dtype)
        summed, normed = triton_layer_norm.add_layer_norm(hidden, delta, weight, bias, 1e-5)
        assert torch.equal(summed, hidden + delta)
        expected = torch.nn.functional.layer_norm((hidden + delta).double(), (6144,), weight.double(), bias.double(), 1e-5)
        torch.testing.assert_close(normed.double(), expected, rtol=tolerance, atol=tolerance * 10)

