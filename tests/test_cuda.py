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
    from starchat.model.tuned_linear import ROW_CANDIDATES

    for dtype in (torch.float32, torch.bfloat16):
        for rows in (1, 8, 33, triton_linear.ROWS_PER_PASS, triton_linear.MAX_ROWS - 1):
            x = torch.randn(rows, 384, device="cuda").to(dtype)
            expected = x.double() @ (weight.double() * scales.to(dtype).double()[:, None]).T + bias.to(dtype).double()
            tolerance = 1e-4 if dtype == torch.float32 else 1e-2
            # the tiled kernel's built-in blocks, and the row kernel's candidates (compiled: words, sign flip)
            for blocks in [None] + [(1, *choice) for choice in ROW_CANDIDATES] * (rows <= 8):
                out = triton_linear.linear(x, weight, scales.to(dtype), bias.to(dtype), blocks)
                assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item()), blocks


def test_wide_tiles_and_tuned_layers_compute_the_product_on_gpu():
    """The 64-row tiles that tuning tries for 17-128 rows (two row blocks launched side by side
    past 64 rows, compiled to wgmma on Hopper), over int8 and bf16 weights; then tuned layers at
    every row count up to the kernel's limit, whichever product each bucket chose."""
    from torch import nn

    from starchat.model import triton_linear, tuned_linear
    from starchat.model.quant import Int8Linear, quantize_per_channel

    x = torch.randn(1, 384, dtype=torch.bfloat16, device="cuda")
    if triton_linear.triton is None or not triton_linear.supports(x):
        pytest.skip("no Triton, or a GPU older than Ampere")
    float_weight = torch.randn(6400, 384, device="cuda") / 20
    weight, scales = quantize_per_channel(float_weight.cpu())
    weight, scales, bias = weight.cuda(), scales.cuda().bfloat16(), torch.randn(6400, device="cuda").bfloat16()
    dense = float_weight.bfloat16()
    for rows in (33, 64, 100, 128):
        x = torch.randn(rows, 384, device="cuda").bfloat16()
        for w, s in ((weight, scales), (dense, None)):
            expected = x.double() @ (w.double() * (s.double()[:, None] if s is not None else 1)).T + bias.double()
            for choice in tuned_linear.WIDE_CANDIDATES:
                blocks = (triton_linear.ROWS_PER_PASS, *choice)
                try:
                    out = triton_linear.linear(x, w, s, bias, blocks)
                except Exception as error:  # shared memory past a smaller GPU's limit: tuning skips it too
                    assert "resource" in str(error).lower() or "shared" in str(error).lower(), error
                    continue
                assert torch.allclose(out.double(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item()), (
                    rows, w.dtype, blocks)

    model = nn.Sequential(nn.Linear(384, 640).cuda().bfloat16(),
                          Int8Linear.from_float(torch.randn(640, 384, device="cuda") / 20, torch.randn(640, device="cuda"),
                                                torch.bfloat16))
    report = tuned_linear.tune_decode_products(model, torch.bfloat16)
    assert {row["rows"] for row in report} == set(tuned_linear.DECODE_ROW_BUCKETS)
    for rows in (1, 5, 16, 40, 64, 100, triton_linear.MAX_ROWS, triton_linear.MAX_ROWS + 30):
        for module in model:
            x = torch.randn(rows, 384, device="cuda").bfloat16()
            weight = module.weight.double() * (module.scales.double()[:, None] if hasattr(module, "scales") else 1)
            expected = x.double() @ weight.T + module.bias.double()
            out = module(x)
            assert torch.allclose(out.double(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item()), (
                rows, type(module).__name__)


def test_a_second_load_takes_the_tuned_choices_from_the_cache(checkpoint, monkeypatch, tmp_path):
    """With the tuning cache on, the second load of a model times no product: every choice comes
    from the first load's file (checked against PyTorch's product) and the tokens are the same."""
    from starchat.model import triton_attention, tuned_linear

    if not triton_attention.supports(torch.device("cuda"), torch.bfloat16):
        pytest.skip("no Triton, or a GPU older than Ampere: nothing is tuned")
    monkeypatch.setenv("STARCHAT_TUNING_CACHE", "1")
    monkeypatch.setenv("STARCHAT_CACHE_DIR", str(tmp_path))
    first = LLM(str(checkpoint), dtype="bfloat16", device="cuda", progress=False)
    tokens = greedy(first, PROMPTS)
    report = first.engine.runner.decode_products
    assert report and not any(row.get("cached") for row in report)
    del first

    def must_not_time(fn, device):
        raise AssertionError("timed again although the choices were stored")

    monkeypatch.setattr(tuned_linear, "per_call_us", must_not_time)
    second = LLM(str(checkpoint), dtype="bfloat16", device="cuda", progress=False)
    cached = second.engine.runner.decode_products
    assert all(row.pop("cached") for row in cached) and cached == report
    assert greedy(second, PROMPTS) == tokens


def test_dependent_launch_gives_the_same_tokens(checkpoint, monkeypatch):
    """STARCHAT_PDL=1 (programmatic dependent launch of every starchat kernel) changes when kernels
    start, never what they compute: the same greedy tokens, bf16 and int8, CUDA graphs and eager."""
    from starchat.model import triton_support

    if triton_support.gdc_wait is None or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90 or newer and a Triton with grid dependency control")
    for quantize in (None, "int8"):
        llm = LLM(str(checkpoint), dtype="bfloat16", device="cuda", quantize=quantize, progress=False)
        plain = greedy(llm, PROMPTS)
        runner = llm.engine.runner
        monkeypatch.setattr(triton_support, "PDL_ENABLED", True)
        assert triton_support.dependent_launch(torch.device("cuda")) == {"USE_PDL": True, "launch_pdl": True}
        runner.decode_graphs = None
        runner.enable_static_decode(len(PROMPTS), llm.engine.max_model_len)  # captured with the dependent launches
        assert greedy(llm, PROMPTS) == plain, quantize
        runner.decode_graphs = None
        assert greedy(llm, PROMPTS) == plain, quantize  # eager
        monkeypatch.setattr(triton_support, "PDL_ENABLED", False)


def test_int8_greedy_tokens_equal_cpu_int8(checkpoint):
    cpu = greedy(LLM(str(checkpoint), dtype="float32", device="cpu", quantize="int8", progress=False), PROMPTS)
    gpu = greedy(LLM(str(checkpoint), dtype="float32", device="cuda", quantize="int8", progress=False), PROMPTS)
    assert gpu == cpu


def test_stored_int8_checkpoint_on_gpu_equals_quantizing_while_loading(checkpoint, tmp_path):
    from starchat.model.quantized_checkpoint import write_quantized_checkpoint

    stored = write_quantized_checkpoint(checkpoint, tmp_path / "int8", progress=False)
    built = LLM(str(checkpoint), dtype="bfloat16", device="cuda", quantize="int8", progress=False)
    built_parameters = {name: p.cpu() for name, p in built.engine.runner.model.named_parameters()}
    built_tokens = greedy(built, PROMPTS)
    del built
    loaded = LLM(str(stored), dtype="bfloat16", device="cuda", progress=False)
    assert loaded.engine.quantize == "int8"
    loaded_parameters = dict(loaded.engine.runner.model.named_parameters())
    assert built_parameters.keys() == loaded_parameters.keys()
    assert all(torch.equal(built_parameters[name], p.cpu()) for name, p in loaded_parameters.items())
    assert greedy(loaded, PROMPTS) == built_tokens


def test_packed_float_checkpoint_on_gpu_equals_its_source(checkpoint, tmp_path):
    """A `starchat pack` folder is unpacked on a GPU: the parameters and greedy tokens of the source."""
    from starchat.model.packed_checkpoint import write_packed_checkpoint

    packed = write_packed_checkpoint(checkpoint, tmp_path / "packed", torch.bfloat16, progress=False)
    source = LLM(str(checkpoint), dtype="bfloat16", device="cuda", progress=False)
    source_parameters = {name: p.cpu() for name, p in source.engine.runner.model.named_parameters()}
    source_tokens = greedy(source, PROMPTS)
    del source
    loaded = LLM(str(packed), dtype="bfloat16", device="cuda", progress=False)
    loaded_parameters = dict(loaded.engine.runner.model.named_parameters())
    assert source_parameters.keys() == loaded_parameters.keys()
    assert all(torch.equal(source_parameters[name], p.cpu()) for name, p in loaded_parameters.items())
    assert greedy(loaded, PROMPTS) == source_tokens


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


def test_chunked_prefill_over_cached_context_equals_one_chunk(checkpoint):
    """Chunks after the first attend to the cache with SDPA's bottom-right causal bias."""
    whole = LLM(str(checkpoint), dtype="float32", device="cuda", progress=False, max_num_batched_tokens=2048)
    chunked = LLM(str(checkpoint), dtype="float32", device="cuda", progress=False, max_num_seqs=4,
                  max_num_batched_tokens=16)
    assert greedy(chunked, PROMPTS) == greedy(whole, PROMPTS)


def test_gelu_in_the_mlp_up_projection_on_gpu(checkpoint):
    from starchat.model import triton_linear, tuned_linear

    llm = LLM(str(checkpoint), dtype="bfloat16", device="cuda", progress=False)
    tanh_gelu = llm.engine.model_config.activation_function != "gelu"
    assert llm.engine.runner.fused_gelus == (llm.engine.model_config.n_layer if tanh_gelu else 0)
    device = torch.device("cuda")
    print("cuBLASLt GELU epilogue gives the tanh GELU:", tuned_linear.check_gelu_epilogue(device, torch.bfloat16))
    weight = torch.randn(3072, 768, device=device, dtype=torch.bfloat16) / 16
    bias = torch.randn(3072, device=device, dtype=torch.bfloat16)
    for rows in (1, 16, 300):
        x = torch.randn(rows, 768, device=device, dtype=torch.bfloat16)
        expected = torch.nn.functional.gelu(x.double() @ weight.double().T + bias.double(), approximate="tanh")
        outputs = {"cublas": tuned_linear.cublas_linear_gelu(x, weight, bias)}
        if triton_linear.supports(x):
            outputs["triton"] = triton_linear.linear(x, weight, None, bias, gelu_tanh=True)
        for name, out in outputs.items():
            assert torch.allclose(out.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item()), (name, rows)


def test_prefill_attention_runs_the_flash_kernel_on_the_expanded_kv_head():
    """Prefill chunks hand SDPA the one MQA key/value head expanded to 48 as a view (stride 0) and,
    after cached tokens, a bottom-right causal bias: both must keep the flash kernel (restricting
    SDPA to it raises where it cannot run)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    device, dtype, heads, head_dim = torch.device("cuda"), torch.bfloat16, 48, 128
    for chunk, context in ((2048, 0), (512, 1536)):
        q = torch.randn(1, heads, chunk, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(1, 1, context + chunk, head_dim, device=device, dtype=dtype).expand(1, heads, -1, head_dim)
                for _ in range(2))
        bias = dict(is_causal=True) if context == 0 else dict(attn_mask=causal_lower_right(chunk, context + chunk))
        expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **bias)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, **bias)
        assert (out.float() - expected).abs().max().item() < 2e-2


def test_step_memory_is_measured_before_the_cache_is_sized(checkpoint):
    from starchat.engine.devices import profile_step_bytes

    llm = LLM(str(checkpoint), dtype="bfloat16", device="cuda", progress=False, max_num_seqs=4)
    model, device = llm.engine.runner.model, torch.device("cuda")
    small = profile_step_bytes(model, 16, 4, torch.bfloat16, device)
    large = profile_step_bytes(model, model.config.n_positions, 4, torch.bfloat16, device)
    print(f"step memory: 16 tokens {small} bytes, {model.config.n_positions} tokens {large} bytes")
    assert small is not None and large is not None and 0 < small < large
    long_prompt = list(range(100, 100 + model.config.n_positions - 8))  # one step of nearly the whole context
    assert len(llm.generate([long_prompt], SamplingParams(max_new_tokens=4, ignore_eos=True))[0].token_ids) == 4


# Engine features on the GPU (last: the kernel and numerics checks above come first when the
# device stage's time limit cuts the run short).


def test_prefix_caching_on_gpu_gives_the_tokens_of_computing_everything(checkpoint):
    """Cached blocks shared by later requests (decodes through CUDA graphs read them by block table)."""
    system = "# Utilities for reading, validating and writing configuration files in several formats.\n" * 4
    prompts = [system + question for question in ("def load(path):", "class Schema:", "import json\n")]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    cached = LLM(str(checkpoint), dtype="float32", device="cuda", progress=False)
    plain = LLM(str(checkpoint), dtype="float32", device="cuda", progress=False, enable_prefix_caching=False)
    first = cached.generate(prompts[:1], params)
    rest = cached.generate(prompts[1:], params)
    assert first[0].num_cached_tokens == 0 and all(c.num_cached_tokens >= 48 for c in rest)
    expected = [c.token_ids for c in plain.generate(prompts, params)]
    assert [c.token_ids for c in first + rest] == expected


def test_speculative_decoding_and_prompt_logprobs_on_gpu(checkpoint):
    """Drafts verified as decode rows on the GPU (in CUDA graphs of their own, and eagerly) give
    the plain engine's tokens, in float32 and bfloat16; prompt log-probabilities on the GPU equal
    the CPU's."""
    repetitive = ["x = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,", "def f():\n    return 1\n\ndef f():\n"] + PROMPTS[:1]
    for dtype in ("bfloat16", "float32"):
        plain = LLM(str(checkpoint), dtype=dtype, device="cuda", progress=False)
        expected = greedy(plain, repetitive)
        for cuda_graphs in (True, False):
            speculative = LLM(str(checkpoint), dtype=dtype, device="cuda", progress=False, num_speculative_tokens=4,
                              cuda_graphs=cuda_graphs)
            assert greedy(speculative, repetitive) == expected, (dtype, cuda_graphs)
            assert speculative.engine.stats().spec_decode_accepted_tokens > 0
            if cuda_graphs:
                steps = speculative.engine.runner.decode_graphs.steps
                assert any(shared for _, _, shared in steps) and all(s.graph is not None for s in steps.values())
    # Sampled verification on the GPU (its random draws on the request's CUDA generator): top_k=1
    # keeps exactly the drafts greedy keeps.
    top1 = SamplingParams(max_new_tokens=32, ignore_eos=True, do_sample=True, top_k=1, repetition_penalty=1.1)
    drafted = speculative.engine.stats().spec_decode_draft_tokens
    assert ([c.token_ids for c in speculative.generate(repetitive, top1)]
            == [c.token_ids for c in plain.generate(repetitive, top1.copy(do_sample=False))])
    assert speculative.engine.stats().spec_decode_draft_tokens > drafted
    scoring = SamplingParams(max_new_tokens=1, prompt_logprobs=2)
    cpu = LLM(str(checkpoint), dtype="float32", device="cpu", progress=False)
    for on_gpu, on_cpu in zip(plain.generate(PROMPTS, scoring), cpu.generate(PROMPTS, scoring)):
        assert [e and e.token_id for e in on_gpu.prompt_logprobs] == [e and e.token_id for e in on_cpu.prompt_logprobs]
        torch.testing.assert_close(torch.tensor([e.logprob for e in on_gpu.prompt_logprobs[1:]]),
                                   torch.tensor([e.logprob for e in on_cpu.prompt_logprobs[1:]]), rtol=1e-3, atol=1e-3)
