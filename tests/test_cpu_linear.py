"""Linear layers on a CPU (starchat/model/cpu_linear.py): packed for the native kernels, or
PyTorch's products where the kernels are unavailable."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from starchat import LLM, SamplingParams
from starchat.model import native
from starchat.model.cpu_linear import ROWS_FOR_FLOAT32, CpuLinear, PackedEmbedding, PackedLinear, prepare_cpu_linears, \
    wants_float32_for_many_rows
from starchat.model.quant import Int8Linear

needs_kernels = pytest.mark.skipif(not native.available(), reason="no C compiler: the kernels fall back to PyTorch")


class _Tied(nn.Module):
    def __init__(self, dtype: torch.dtype, vocab: int = 40):
        super().__init__()
        self.embed = nn.Embedding(vocab, 24).to(dtype)
        self.body = nn.Linear(24, 24).to(dtype)
        self.head = nn.Linear(24, vocab, bias=False).to(dtype)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids)))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [40, 48])  # a padded last panel (table copied), whole panels (packed in place)
def test_packed_model_equals_the_plain_one(dtype, vocab):
    torch.manual_seed(0)
    model = _Tied(dtype, vocab)
    table = model.embed.weight.data_ptr()
    ids = torch.randint(0, vocab, (2, 150))  # 300 rows: many tiles and two blocks of rows in one product
    reference = _double(model)(ids)
    prepare_cpu_linears(model)
    assert type(model.body) is PackedLinear and type(model.head) is PackedLinear and type(model.embed) is PackedEmbedding
    assert model.embed.packed_weight is model.head.packed_weight  # the tied table is stored once
    assert (model.head.packed_weight.data_ptr() == table) == (vocab % 16 == 0)  # in place when no padding is needed
    assert sum(p.numel() for p in model.parameters()) == 48 * 24 + 32 * 24 + 24  # outputs padded to whole panels of 16
    out = model(ids)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and out.shape == (2, 150, vocab)
    assert ((out.double() - reference).abs().max() / reference.abs().max()) < tolerance


def _double(model: _Tied) -> _Tied:
    copy = _Tied(torch.float64, model.embed.num_embeddings)
    copy.load_state_dict({name: tensor.double() for name, tensor in model.state_dict().items()})
    return copy


@needs_kernels
def test_int8_layers_are_packed_with_their_scales():
    torch.manual_seed(0)
    weight, bias = torch.randn(33, 20), torch.randn(33)
    layer = Int8Linear.from_float(weight, bias, torch.bfloat16)
    x = torch.randn(7, 20).bfloat16()
    expected = layer(x)  # PyTorch: dequantized float32 product
    holder = nn.Sequential(layer)
    prepare_cpu_linears(holder)
    assert type(holder[0]) is PackedLinear and holder[0].packed_weight.dtype == torch.int8
    torch.testing.assert_close(holder[0](x).float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_without_kernels_pytorch_products(dtype, monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).to(dtype)
    prepare_cpu_linears(model)
    layer = model[0]
    assert type(layer) is CpuLinear
    many = torch.randn(3, ROWS_FOR_FLOAT32, 64).to(dtype)  # rows counted over leading dims
    if wants_float32_for_many_rows(torch.device("cpu"), dtype):
        expected = nn.functional.linear(many.float(), layer.weight.float(), layer.bias.float()).to(dtype)
    else:
        expected = nn.functional.linear(many, layer.weight, layer.bias)
    assert torch.equal(layer(many), expected)
    few = torch.randn(1, 64).to(dtype)
    assert torch.equal(layer(few), nn.functional.linear(few, layer.weight, layer.bias))


def test_loader_prepares_every_cpu_model(tiny_model_dir):
    expected = PackedLinear if native.available() else CpuLinear
    for dtype in ("float32", "float16"):
        model = LLM(str(tiny_model_dir), dtype=dtype, device="cpu", progress=False).engine.runner.model
        assert all(type(m) is expected for m in (model.lm_head, model.transformer.h[0].attn.c_attn, model.transformer.h[1].mlp.c_proj))
        assert not [m for m in model.modules() if type(m) in (nn.Linear, Int8Linear)]
    quantized = LLM(str(tiny_model_dir), dtype="bfloat16", device="cpu", progress=False, quantize="int8").engine.runner.model
    if native.available():
        assert all(m.packed_weight.dtype == torch.int8 for m in (quantized.lm_head, quantized.transformer.h[0].mlp.c_fc))
        assert type(quantized.transformer.wte) is nn.Embedding  # int8 lm_head: the table stays in float for lookups
    else:
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


@needs_kernels
def test_16_bit_models_compute_in_float32(tiny_model_dir):
    """Packed CPU models keep 16-bit weights and cache but float32 activations (cpu_linear.compute_in_float32)."""
    llm = LLM(str(tiny_model_dir), dtype="bfloat16", device="cpu", progress=False)
    model = llm.engine.runner.model
    assert model.lm_head.packed_weight.dtype == torch.bfloat16 and llm.engine.runner.kv_cache.dtype == torch.bfloat16
    assert model.transformer.ln_f.weight.dtype == torch.float32
    seen = []
    model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].dtype, output.dtype)))
    completion = llm.generate(["def f():"], SamplingParams(max_new_tokens=3, ignore_eos=True))[0]
    assert len(completion.token_ids) == 3
    assert seen and all(dtypes == (torch.float32, torch.float32) for dtypes in seen)  # the prefill step's product


# ---- oneDNN's AMX products for prefill-sized bfloat16 and int8 products -----------------------

@needs_kernels
@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_amx_products_equal_the_native_kernel_to_bfloat16_rounding(kind, monkeypatch):
    """Forced on (oneDNN's bf16 product runs on any CPU, on AMX tiles where there are some): from
    AMX_MIN_ROWS rows the weight is unpacked and multiplied with bf16-rounded inputs; fewer rows
    stay on the native kernel. Both judged against float64 on the same (quantized) weight."""
    from starchat.model import cpu_linear

    torch.manual_seed(0)
    weight, bias = torch.randn(40, 96), torch.randn(40)
    if kind == "int8":
        source = Int8Linear.from_float(weight, bias, torch.bfloat16)
        exact = source.weight.double() * source.scales.double()[:, None]
    else:
        source = nn.Linear(96, 40).to(torch.bfloat16)
        source.weight.data.copy_(weight)
        source.bias.data.copy_(bias)
        exact = source.weight.double()
    exact_bias = source.bias.double()
    layer = PackedLinear.from_module(source)
    layer.amx_products, layer.amx_min_rows = True, 0  # (oneDNN's path only: amx.c has its own test)
    calls = []
    amx_forward = layer._amx_forward
    monkeypatch.setattr(layer, "_amx_forward", lambda x: calls.append(1) or amx_forward(x))
    for rows in (cpu_linear.AMX_MIN_ROWS - 1, cpu_linear.AMX_MIN_ROWS, cpu_linear.AMX_MIN_ROWS + 100):
        x = torch.randn(rows, 96)  # float32 activations, as in a packed CPU model
        expected = x.double() @ exact.T + exact_bias
        out = layer(x.view(1, rows, 96)).view(rows, 40)
        assert out.dtype == torch.float32
        error = ((out.double() - expected).abs().max() / expected.abs().max()).item()
        native_tolerance = 1e-4 if kind == "int8" and native.int8_rows_quantized() else 1e-5  # 15-bit rows (VNNI)
        assert error < (native_tolerance if rows < cpu_linear.AMX_MIN_ROWS else 1.6e-2), (rows, error)
    assert len(calls) == 2  # the two prefill-sized products only
    assert torch.equal(cpu_linear.unpack_weight(layer.packed_weight, 40, torch.float32), source.weight.float())


@needs_kernels
def test_amx_products_unpack_into_one_shared_buffer(monkeypatch):
    """The layers of a model unpack their weights for oneDNN's products into one Workspace (the
    weight is dead once multiplied): the same results as unpacking into fresh memory, one address."""
    from starchat.model import cpu_linear

    torch.manual_seed(1)
    layers = [PackedLinear.from_module(nn.Linear(96, n).to(torch.bfloat16)) for n in (64, 40)]  # the buffer never grows
    x = torch.randn(cpu_linear.AMX_MIN_ROWS, 96)
    fresh = [layer._amx_forward(x) for layer in layers]
    shared, addresses = cpu_linear.Workspace(), []
    unpack = native.unpack_bf16
    monkeypatch.setattr(native, "unpack_bf16", lambda packed, n, out=None: addresses.append(out.data_ptr()) or unpack(packed, n, out))
    for layer in layers:
        layer.unpack_workspace = shared
    assert all(torch.equal(layer._amx_forward(x), expected) for layer, expected in zip(layers, fresh))
    assert len(addresses) == 2 and addresses[0] == addresses[1]


def test_amx_products_are_chosen_by_the_cpu_and_can_be_turned_off(monkeypatch):
    from starchat.model import cpu_linear

    checks = (cpu_linear.amx_products_pay_off, cpu_linear.native_amx_tiles)  # cached once per process

    def clear():
        for check in checks:
            check.cache_clear()

    clear()
    try:
        monkeypatch.setenv("STARCHAT_CPU_AMX", "0")  # both AMX paths off, oneDNN's and the panels'
        assert not cpu_linear.amx_products_pay_off() and not cpu_linear.native_amx_tiles()
        assert cpu_linear.native_amx_min_rows(torch.float16) == cpu_linear.native_amx_min_rows(torch.bfloat16) == 0
        clear()
        monkeypatch.delenv("STARCHAT_CPU_AMX")
        # the panels' path does not hang on oneDNN's check: granted and timed on its own (AMX tiles
        # multiply 32 rows about 5x faster than the AVX tiles on any CPU that has them)
        monkeypatch.setattr(cpu_linear, "amx_products_pay_off", lambda: False)
        assert cpu_linear.native_amx_tiles() == (native.available() and native.amx_init())
        clear()
        monkeypatch.setattr(cpu_linear, "_cpu_feature", lambda name: False)
        assert not cpu_linear.native_amx_tiles()  # no AMX: nothing timed, the native kernel
    finally:
        monkeypatch.undo()
        clear()
    float_layer = PackedLinear.from_module(nn.Linear(8, 16).to(torch.float16)) if native.available() else None
    assert float_layer is None or not float_layer.amx_products  # float16 and float32 weights: never


@needs_kernels
def test_amx_row_thresholds_follow_whether_the_weights_fit_in_the_cpus_cache(tiny_model_dir, monkeypatch):
    """A model whose weights exceed the last-level cache reads them from memory every step, and AMX
    pays off from fewer rows there: the loader picks the thresholds by the model's packed bytes
    against the cache size sysfs reports (forced both ways here; AMX assumed granted)."""
    from starchat.model import cpu_linear

    monkeypatch.setattr(cpu_linear, "native_amx_tiles", lambda: True)
    cached = {torch.bfloat16: cpu_linear.NATIVE_AMX_MIN_ROWS, torch.int8: cpu_linear.NATIVE_AMX_MIN_ROWS_INT8,
              torch.float16: cpu_linear.NATIVE_AMX_MIN_ROWS_FLOAT16}
    for cache_bytes, expected in ((1 << 40, cached), (1 << 10, cpu_linear.STREAMED_AMX_MIN_ROWS)):
        monkeypatch.setattr(cpu_linear, "last_level_cache_bytes", lambda: cache_bytes)
        for dtype, quantize in (("bfloat16", None), ("bfloat16", "int8"), ("float16", None)):
            model = LLM(str(tiny_model_dir), dtype=dtype, quantize=quantize, progress=False).engine.runner.model
            layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
            assert layers and all(m.amx_min_rows == expected[m.packed_weight.dtype] for m in layers), (cache_bytes, dtype)


def test_the_last_level_cache_size_is_read_from_sysfs(monkeypatch, tmp_path):
    from starchat.model import cpu_linear

    for index, size in enumerate(("48K", "2048K", "491520K", "")):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    real_path = cpu_linear.Path
    monkeypatch.setattr(cpu_linear, "Path", lambda text: tmp_path if "cache" in str(text) else real_path(text))
    assert cpu_linear.last_level_cache_bytes() == 491520 << 10
    monkeypatch.setattr(cpu_linear, "Path", lambda text: tmp_path / "absent")
    assert cpu_linear.last_level_cache_bytes() == 32 << 20  # nothing reported: a common server L3


@needs_kernels
def test_a_bfloat16_model_with_amx_prefill_tracks_float32(tiny_model_dir, monkeypatch):
    """As the loader sets a bfloat16 model up where AMX products pay off (forced here): every
    packed layer's prefill products on AMX tiles (chunks of AMX_MIN_ROWS+ rows through oneDNN,
    shorter ones from the panels where the native library is granted tiles, else the native
    kernel) and prompt chunks attending in bfloat16, on AMX tiles where granted (a float16 model
    takes only the panels' tiles for its products and attends in split halves on the tiles, or in
    float32).
    Prompt logits stay within the 3% of the largest that bfloat16 is held to
    (test_engine_reference), the first greedy tokens agree with float32 on all but one prompt,
    and decoding continues from the cache prefill wrote."""
    from test_engine_reference import PROMPTS, our_prompt_logits

    from starchat.model import cpu_linear
    from starchat.model.attention import PromptAttention
    from starchat.model.gpt_bigcode import Attention

    monkeypatch.setattr(cpu_linear, "amx_products_pay_off", lambda: True)
    # oneDNN takes chunks from 1,280 rows by default; 384 puts this test's 512-token step there
    monkeypatch.setattr(cpu_linear, "AMX_MIN_ROWS", 384)
    fp16 = LLM(str(tiny_model_dir), dtype="float16", progress=False).engine.runner.model
    assert not any(getattr(m, "amx_products", False) for m in fp16.modules())
    # float16 prompts attend on the tiles in split halves where granted, else in float32
    tiles = cpu_linear.native_amx_tiles()
    assert all(m.prompt_attention == PromptAttention(None, tiles, True) for m in fp16.modules() if isinstance(m, Attention))
    # float16 weights: the panels' AMX tiles only (split into exact bfloat16 halves), never oneDNN's
    fp16_rows = cpu_linear.NATIVE_AMX_MIN_ROWS_FLOAT16 if cpu_linear.native_amx_tiles() else 0
    assert all(m.amx_min_rows == fp16_rows for m in fp16.modules() if isinstance(m, PackedLinear))
    fp32 = LLM(str(tiny_model_dir), dtype="float32", progress=False)
    bf16 = LLM(str(tiny_model_dir), dtype="bfloat16", progress=False, max_num_batched_tokens=512)
    layers = [m for m in bf16.engine.runner.model.modules() if isinstance(m, PackedLinear)]
    attentions = [m for m in bf16.engine.runner.model.modules() if isinstance(m, Attention)]
    assert attentions and all(m.prompt_attention == PromptAttention(torch.bfloat16, tiles, False) for m in attentions)
    calls = []
    for layer in layers:
        assert layer.amx_products
        layer._amx_forward = (lambda forward: lambda x: calls.append(1) or forward(x))(layer._amx_forward)
    # 72 to 321 tokens (within the checkpoint's 512 positions), alone for the logits; generate's
    # first prefill step takes 512 of their 744 tokens together, over AMX_MIN_ROWS (384 here)
    long_prompts = [PROMPTS[0] * 12, PROMPTS[1] * 3, PROMPTS[1] * 10, PROMPTS[3] * 4]
    for prompt in long_prompts:
        ids = fp32.tokenizer.encode(prompt)
        a, b = our_prompt_logits(fp32, ids), our_prompt_logits(bf16, ids)
        assert (a - b).abs().max().item() <= 0.03 * a.abs().max().item()
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    ours, reference = bf16.generate(long_prompts, params), fp32.generate(long_prompts, params)
    assert sum(x.token_ids[0] == y.token_ids[0] for x, y in zip(ours, reference)) >= len(long_prompts) - 1
    # every layer but the lm_head (the prompts' last rows only) in generate's first prefill step
    assert len(calls) >= len(layers) - 1


@needs_kernels
def test_decode_steps_of_any_size_keep_the_native_step(tiny_model_dir, monkeypatch):
    """Decode steps stay one native call however many rows they have: where AMX tiles are
    granted, their bfloat16 products of 8+ rows run on them inside the step (amx.c)."""
    from starchat.model import cpu_linear

    monkeypatch.setattr(cpu_linear, "amx_products_pay_off", lambda: True)
    llm = LLM(str(tiny_model_dir), dtype="bfloat16", progress=False, max_num_seqs=80)
    runner = llm.engine.runner
    layers = [m for m in runner.model.modules() if isinstance(m, PackedLinear)]
    expected = cpu_linear.NATIVE_AMX_MIN_ROWS if cpu_linear.native_amx_tiles() else 0
    assert layers and all(layer.amx_min_rows == expected for layer in layers)
    fused_rows = []
    step = runner.model.fused_decode.step
    monkeypatch.setattr(runner.model.fused_decode, "step",
                        lambda token_ids, *args: fused_rows.append(len(token_ids)) or step(token_ids, *args))
    prompts = [f"# task {i}\ndef f_{i}(x):" for i in range(70)]
    completions = llm.generate(prompts, SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert all(len(c.token_ids) == 5 for c in completions)
    assert max(fused_rows) == 70


@needs_kernels
def test_the_mlps_share_one_workspace_and_compute_the_same(tiny_model_dir):
    """A packed model's MLP up projections write into one buffer that every layer reuses (their
    output is dead once the down projection has read it): the same logits bit for bit as with a
    fresh output per layer, and every layer's up projection at the same address. The model's
    products unpack their weights for oneDNN into another shared buffer."""
    from test_engine_reference import PROMPTS, our_prompt_logits

    from starchat.model.gpt_bigcode import MLP

    llm = LLM(str(tiny_model_dir), dtype="bfloat16", progress=False)
    mlps = [m for m in llm.engine.runner.model.modules() if isinstance(m, MLP)]
    workspace = mlps[0].c_fc.output_workspace
    assert len(mlps) > 1 and workspace is not None and all(m.c_fc.output_workspace is workspace for m in mlps)
    assert all(m.c_proj.output_workspace is None for m in mlps)
    packed = [m for m in llm.engine.runner.model.modules() if isinstance(m, PackedLinear)]
    assert all(m.unpack_workspace is packed[0].unpack_workspace is not None for m in packed)
    assert packed[0].unpack_workspace is not workspace  # both live at once in an MLP
    addresses = []
    for mlp in mlps:
        def spy(x, forward=mlp.c_fc.forward, **options):
            out = forward(x, **options)
            addresses.append(out.data_ptr())
            return out
        mlp.c_fc.forward = spy
    ids = llm.tokenizer.encode(PROMPTS[3])
    shared = our_prompt_logits(llm, ids)
    assert len(addresses) == len(mlps) and set(addresses) == {workspace._buffer.data_ptr()}
    for mlp in mlps:
        mlp.c_fc.output_workspace = None
    assert torch.equal(our_prompt_logits(llm, ids), shared)
