"""int8 weight-only quantization: close to the 16-bit model, same greedy tokens on most prompts."""

from __future__ import annotations

import pytest
import torch

from starchat import LLM, SamplingParams
from starchat.model.quant import Int8Linear, quantize_per_channel

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:", "SELECT * FROM", "# sort a list", "x = [1, 2,"]


def test_per_channel_quantization_round_trip():
    weight = torch.randn(64, 32) * torch.linspace(0.01, 3, 64)[:, None]  # very different row ranges
    quantized, scales = quantize_per_channel(weight)
    assert quantized.dtype == torch.int8 and scales.shape == (64,)
    error = (quantized.float() * scales[:, None] - weight).abs()
    assert (error <= scales[:, None] / 2 + 1e-6).all()  # at most half a step per row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantization_in_row_slices_equals_the_whole_tensor_formula(dtype, monkeypatch):
    from starchat.model import quant

    monkeypatch.setattr(quant, "QUANTIZE_ROWS_PER_PASS", 16)  # 100 rows: six full slices and a partial one
    weight = (torch.randn(100, 40) * torch.linspace(0.01, 3, 100)[:, None]).to(dtype)
    weight[3] = 0  # an all-zero row keeps a positive scale
    original = weight.clone()
    quantized, scales = quant.quantize_in_slices(weight)  # the path without native kernels (and on GPUs)
    assert torch.equal(weight, original)  # the input is not divided in place (float32 slices are views)
    assert_whole_tensor_formula(weight, quantized, scales)


def assert_whole_tensor_formula(weight, quantized, scales):
    """The per-channel formula over the whole tensor at once, in float32."""
    expected_scales = weight.float().abs().amax(dim=1).clamp(min=1e-8) / 127.0
    expected = torch.round(weight.float() / expected_scales[:, None]).clamp(-127, 127).to(torch.int8)
    assert torch.equal(scales, expected_scales)
    mismatched = (quantized != expected).nonzero()
    assert torch.equal(quantized, expected), f"{len(mismatched)} values differ, first at {mismatched[:3].tolist()}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_native_quantization_gives_the_formulas_bits(dtype):
    from starchat.model import native

    if not native.available():
        pytest.skip("native kernels not built here")
    generator = torch.Generator().manual_seed(3)
    # 37 columns: four 8-wide vector steps and a scalar tail; rows of very different ranges
    weight = (torch.randn(70, 37, generator=generator) * torch.logspace(-4, 1, 70)[:, None]).to(dtype)
    weight[5] = 0  # all zeros: the smallest scale
    # ties: a row whose largest value is 127 has a scale of exactly 1, so k + 0.5 rounds to even
    weight[9] = torch.tensor([127.0, -127.0] + [(k % 16) - 7.5 for k in range(35)]).to(dtype)
    weight[10, :4] = torch.tensor([-0.0, 1e-30, -1e-30, 3.0]).to(dtype)  # tiny values beside a large one
    quantized, scales = native.quantize_per_channel(weight)
    assert_whole_tensor_formula(weight, quantized, scales)
    assert quantized[9, 2:18].tolist() == [-8, -6, -6, -4, -4, -2, -2, 0, 0, 2, 2, 4, 4, 6, 6, 8]  # half to even
    # what loading calls: the native path on CPUs, for views too
    view = weight.t().contiguous().t()
    assert not view.is_contiguous()
    routed, routed_scales = quantize_per_channel(view)
    assert torch.equal(routed, quantized) and torch.equal(routed_scales, scales)
    with pytest.raises(ValueError, match="native quantize"):
        native.quantize_per_channel(weight.to(torch.int8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_linear_matches_dequantized_reference(dtype):
    weight, bias, x = torch.randn(48, 32), torch.randn(48), torch.randn(5, 32)
    module = Int8Linear.from_float(weight, bias, dtype)
    quantized, scales = quantize_per_channel(weight)
    reference = x @ (quantized.float() * scales[:, None]).T + bias
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(module(x.to(dtype)).float(), reference, rtol=tolerance, atol=tolerance * reference.abs().max().item())


def test_int8_model_stays_close_to_bf16(tiny_model_dir):
    bf16 = LLM(str(tiny_model_dir), dtype="bfloat16", progress=False)
    int8 = LLM(str(tiny_model_dir), dtype="bfloat16", quantize="int8", progress=False)
    # On CPU with the native kernels each Int8Linear is then packed (cpu_linear.PackedLinear), int8 kept.
    linears = [m for m in int8.engine.runner.model.modules()
               if isinstance(m, Int8Linear) or getattr(m, "packed_weight", torch.empty(0)).dtype == torch.int8]
    assert len(linears) == 2 * 4 + 1  # four per layer, two layers, and the lm_head
    params = SamplingParams(max_new_tokens=16, ignore_eos=True, logprobs=0)
    a, b = bf16.generate(PROMPTS, params), int8.generate(PROMPTS, params)
    agree = sum(x.token_ids[:8] == y.token_ids[:8] for x, y in zip(a, b))
    assert agree >= len(PROMPTS) // 2, f"int8 and bf16 agree on the first 8 tokens of only {agree}/{len(PROMPTS)} prompts"
    # Up to the first differing token, the chosen tokens' log-probabilities are close.
    drifts = []
    for x, y in zip(a, b):
        for p, q in zip(x.logprobs, y.logprobs):
            if p.token_id != q.token_id:
                break
            drifts.append(abs(p.logprob - q.logprob))
    assert drifts and max(drifts) < 0.1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_with_nan_or_infinity_are_refused_by_both_quantizers(bad):
    from starchat.model import native, quant

    for columns, at in ((37, 35), (37, 3), (64, 8)):  # in the scalar tail, in an 8-wide step
        weight = torch.randn(5, columns)
        weight[2, at] = bad
        quantizers = [quant.quantize_in_slices] + ([native.quantize_per_channel] if native.available() else [])
        for quantize in quantizers:
            with pytest.raises(ValueError, match="NaN or infinite"):
                quantize(weight.to(torch.bfloat16))


def test_loading_a_damaged_checkpoint_with_int8_names_the_tensor(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from starchat.model.loader import CheckpointError, load_model

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, damaged)
    tensors = load_file(str(damaged / "model.safetensors"))
    tensors["transformer.h.1.mlp.c_fc.weight"][7, 3] = float("nan")
    save_file(tensors, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor transformer\.h\.1\.mlp\.c_fc\.weight holds NaN or infinite values"):
        load_model(damaged, torch.bfloat16, torch.device("cpu"), progress=False, quantize="int8")
    from starchat.model.quantized_checkpoint import QuantizedCheckpointError, write_quantized_checkpoint

    with pytest.raises(QuantizedCheckpointError, match=r"tensor transformer\.h\.1\.mlp\.c_fc\.weight holds NaN"):
        write_quantized_checkpoint(damaged, tmp_path / "int8", progress=False)
    assert not (tmp_path / "int8").exists() and not (tmp_path / "int8.partial").exists()
