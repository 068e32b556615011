"""`starchat pack`: float checkpoints stored in the CPU kernels' panels load as the model built from
the source checkpoint, bit for bit, mapped where they lie on a CPU with the native kernels and
unpacked elsewhere; bad inputs get one clear error."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from process_memory import mappings_of
from reference_checkpoints import write_hf_checkpoint
from starchat import LLM, SamplingParams
from starchat.model import native
from starchat.model.cpu_linear import PackedEmbedding, PackedLinear
from starchat.model.loader import find_weight_files, load_model
from starchat.model.packed_checkpoint import PACKING_KEY, PackedCheckpointError, checkpoint_packing, write_packed_checkpoint
from starchat.model.quantized_checkpoint import QuantizedCheckpointError, write_quantized_checkpoint

CPU = torch.device("cpu")


def _stored(model_dir) -> dict[str, tuple[torch.dtype, list[int]]]:
    stored = {}
    for weight_file in find_weight_files(model_dir):
        with safe_open(str(weight_file.path), framework="pt") as handle:
            for name in handle.keys():
                if not name.startswith("__padding__."):
                    piece = handle.get_slice(name)
                    stored[name] = (piece.get_dtype(), piece.get_shape())
    return stored


def _assert_same_model(source, packed, dtype, **options):
    built = load_model(source, dtype, CPU, progress=False, **options)
    stored = load_model(packed, dtype, CPU, progress=False, **options)
    built_state, stored_state = built.state_dict(), stored.state_dict()
    assert built_state.keys() == stored_state.keys()
    for name, value in built_state.items():
        assert value.dtype == stored_state[name].dtype and torch.equal(value, stored_state[name]), name
    return stored


def test_pack_command_writes_panels_that_load_as_the_source_model(tiny_model_dir, tmp_path):
    output = tmp_path / "packed"
    done = subprocess.run([sys.executable, "-m", "starchat.cli.main", "pack", str(tiny_model_dir), str(output),
                           "--dtype", "bfloat16"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"wrote {output}" in done.stdout
    config = json.loads((output / "config.json").read_text())
    assert config[PACKING_KEY]["weight_layout"] == "panels" and config["torch_dtype"] == "bfloat16"
    assert checkpoint_packing(output) == torch.bfloat16 and checkpoint_packing(tiny_model_dir) is None
    assert (output / "tokenizer.json").is_file()
    stored = _stored(output)
    hidden, vocab = config["n_embd"], config["vocab_size"]
    assert {dtype for dtype, _ in stored.values()} == {"BF16"}
    assert "transformer.wte.weight" not in stored  # tied: only the packed lm_head holds the table
    assert stored["lm_head.weight"][1] == [-(-vocab // 16), hidden, 16]
    assert stored["transformer.h.0.mlp.c_fc.weight"][1] == [4 * hidden // 16, hidden, 16]
    assert stored["transformer.h.0.ln_1.weight"][1] == [hidden]
    model = _assert_same_model(tiny_model_dir, output, torch.bfloat16)
    if native.available():
        assert isinstance(model.transformer.wte, PackedEmbedding) and model.transformer.wte.packed_weight is model.lm_head.packed_weight

    # served: the same tokens as the source checkpoint in the same dtype (its default dtype too)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    packed_llm = LLM(str(output), device="cpu", progress=False)
    source_llm = LLM(str(tiny_model_dir), device="cpu", dtype="bfloat16", progress=False)
    assert packed_llm.engine.dtype == torch.bfloat16
    for prompt in ("def f(x):", "import os"):
        assert packed_llm.generate(prompt, params)[0].token_ids == source_llm.generate(prompt, params)[0].token_ids


@pytest.mark.skipif(not native.available() or not Path("/proc/self/maps").is_file(),
                    reason="panels are kept as stored only with the native kernels; mappings read from Linux's /proc")
def test_packed_weights_are_used_where_they_lie(tiny_model_dir, tmp_path):
    output = write_packed_checkpoint(tiny_model_dir, tmp_path / "packed", torch.float16, progress=False)
    digest = hashlib.sha256((output / "model.safetensors").read_bytes()).hexdigest()
    model = load_model(output, torch.float16, CPU, progress=False)
    spans = mappings_of(output)
    packed = [module for module in model.modules() if isinstance(module, PackedLinear)]
    assert spans and len(packed) == 4 * model.config.n_layer + 1
    for module in packed:
        address = module.packed_weight.data_ptr()
        assert module.mapped_from_file and address % 4096 == 0 and any(begin <= address < end for begin, end in spans)
    llm = LLM(str(output), device="cpu", progress=False)
    llm.generate("def f(x):", SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert hashlib.sha256((output / "model.safetensors").read_bytes()).hexdigest() == digest  # never written

    # in another dtype the panels are unpacked and converted: nothing stays mapped
    model = load_model(output, torch.float32, CPU, progress=False)
    assert not any(getattr(module, "mapped_from_file", False) for module in model.modules())


def test_multi_head_untied_checkpoint_in_shards(tmp_path):
    """A multi-head c_attn is stored in the loaded order (q, k, v per head -> all q | all k | all v)
    and an untied lm_head beside the embedding's rows; shards split where they must."""
    source = write_hf_checkpoint(tmp_path / "mha", seed=4, multi_query=False, tie_word_embeddings=False,
                                 activation_function="gelu")
    output = write_packed_checkpoint(source, tmp_path / "packed", max_shard_bytes=1 << 20, progress=False)
    assert (output / "model.safetensors.index.json").is_file() and len(find_weight_files(output)) > 1
    assert not (tmp_path / "packed.partial").exists()
    stored = _stored(output)
    assert stored["transformer.wte.weight"][1] == [49156, 64] and stored["lm_head.weight"][1] == [-(-49156 // 16), 64, 16]
    assert {dtype for dtype, _ in stored.values()} == {"F32"}  # the source's torch_dtype
    _assert_same_model(source, output, torch.float32)


def test_panels_unpacked_without_the_native_kernels_or_in_another_dtype(tiny_mha_model_dir, tmp_path, monkeypatch):
    """A GPU, a CPU without the native kernels, another dtype or int8 quantization unpack the
    panels into the (N, K) weights: the model the source gives there."""
    output = write_packed_checkpoint(tiny_mha_model_dir, tmp_path / "packed", torch.float32, progress=False)
    _assert_same_model(tiny_mha_model_dir, output, torch.bfloat16)  # converted after unpacking, as the source is
    _assert_same_model(tiny_mha_model_dir, output, torch.bfloat16, quantize="int8")  # quantized from the stored values
    monkeypatch.setattr(native, "available", lambda: False)
    model = _assert_same_model(tiny_mha_model_dir, output, torch.float32)
    assert not any(isinstance(module, PackedLinear) for module in model.modules())
    assert model.lm_head.weight is model.transformer.wte.weight  # tied again, as the source loads


def test_bad_inputs_get_one_clear_error(tiny_model_dir, tmp_path):
    packed = write_packed_checkpoint(tiny_model_dir, tmp_path / "packed", progress=False)
    with pytest.raises(PackedCheckpointError, match="already exists"):
        write_packed_checkpoint(tiny_model_dir, packed, progress=False)
    with pytest.raises(PackedCheckpointError, match="pack the float checkpoint it came from"):
        write_packed_checkpoint(packed, tmp_path / "twice", progress=False)
    with pytest.raises(QuantizedCheckpointError, match="quantize the float checkpoint it came from"):
        write_quantized_checkpoint(packed, tmp_path / "int8", progress=False)
    int8 = write_quantized_checkpoint(tiny_model_dir, tmp_path / "int8", progress=False)
    with pytest.raises(PackedCheckpointError, match="pack the float checkpoint it came from"):
        write_packed_checkpoint(int8, tmp_path / "packed-int8", progress=False)

    config = json.loads((packed / "config.json").read_text())
    config[PACKING_KEY]["weight_layout"] = "tiles"
    (packed / "config.json").write_text(json.dumps(config))
    with pytest.raises(PackedCheckpointError, match="not a packing starchat knows"):
        load_model(packed, torch.float32, CPU, progress=False)

    done = subprocess.run([sys.executable, "-m", "starchat.cli.main", "pack", str(tiny_model_dir), str(tmp_path / "x"),
                           "--dtype", "int4"], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip() == "error: --dtype: one of auto, float16, bfloat16, float32, got 'int4'"
    done = subprocess.run([sys.executable, "-m", "starchat.cli.main", "pack", str(tiny_model_dir), str(packed)],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "already exists" in done.stderr and "Traceback" not in done.stderr


def test_bench_refuses_an_hf_baseline_it_cannot_load(tiny_model_dir, tmp_path):
    packed = write_packed_checkpoint(tiny_model_dir, tmp_path / "packed", progress=False)
    done = subprocess.run([sys.executable, "-m", "starchat.cli.main", "bench", "latency", "--model", str(packed), "--hf",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "HF transformers cannot read; measure the HF baseline on the float checkpoint" in done.stderr


def test_training_refuses_a_packed_checkpoint(tiny_model_dir, tmp_path):
    from starchat.train.model_setup import prepare_model

    packed = write_packed_checkpoint(tiny_model_dir, tmp_path / "packed", progress=False)
    with pytest.raises(ValueError, match="train from the float checkpoint it was packed from"):
        prepare_model(str(packed), add_chat_tokens=False)
