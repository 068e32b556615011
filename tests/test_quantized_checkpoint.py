"""`starchat quantize`: checkpoints stored with int8 weights load as the model `--quantize int8`
builds from the float checkpoint, bit for bit, and bad folders get one clear error."""

from __future__ import annotations

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
from starchat.model.cpu_linear import PackedLinear
from starchat.model.loader import find_weight_files, load_model
from starchat.model.quantized_checkpoint import (QUANT_METHOD, QuantizedCheckpointError, checkpoint_quantization,
                                                 write_quantized_checkpoint)


def _stored_dtypes(model_dir) -> dict[str, torch.dtype]:
    dtypes = {}
    for weight_file in find_weight_files(model_dir):
        with safe_open(str(weight_file.path), framework="pt") as handle:
            for name in handle.keys():
                dtypes[name] = handle.get_slice(name).get_dtype()
    return dtypes


def _assert_same_model(float_dir, quantized_dir, dtype=torch.bfloat16):
    built = load_model(float_dir, dtype, torch.device("cpu"), progress=False, quantize="int8")
    stored = load_model(quantized_dir, dtype, torch.device("cpu"), progress=False)  # int8 from its config.json
    built_parameters, stored_parameters = dict(built.named_parameters()), dict(stored.named_parameters())
    assert built_parameters.keys() == stored_parameters.keys()
    for name, parameter in built_parameters.items():
        assert parameter.dtype == stored_parameters[name].dtype, name
        assert torch.equal(parameter, stored_parameters[name]), name  # packed for the CPU kernels as loaded


def test_quantize_command_writes_int8_weights_that_load_as_the_quantized_model(tiny_model_dir, tmp_path):
    output = tmp_path / "int8"
    done = subprocess.run([sys.executable, "-m", "starchat.cli.main", "quantize", str(tiny_model_dir), str(output)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {output}" in done.stdout
    config = json.loads((output / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == QUANT_METHOD and checkpoint_quantization(output) == "int8"
    assert checkpoint_quantization(tiny_model_dir) is None
    assert config["quantization_config"]["weight_layout"] == "panels"
    dtypes = _stored_dtypes(output)
    assert dtypes["transformer.h.0.mlp.c_fc.weight"] == "I8" and dtypes["transformer.h.0.mlp.c_fc.weight_scale"] == "F32"
    assert dtypes["lm_head.weight"] == "I8"  # the tied head, stored as its own int8 table
    assert dtypes["transformer.wte.weight"] == dtypes["transformer.h.0.mlp.c_fc.bias"] == "F32"  # the source's dtype
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (output / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    _assert_same_model(tiny_model_dir, output)

    # through the engine: int8 without --quantize, the same greedy tokens as quantizing while loading
    stored, built = LLM(str(output), device="cpu", progress=False), LLM(str(tiny_model_dir), device="cpu", quantize="int8", progress=False)
    assert stored.engine.quantize == "int8" and stored.engine.dtype == built.engine.dtype
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    for prompt in ("def f(x):", "import os"):
        assert stored.generate(prompt, params)[0].token_ids == built.generate(prompt, params)[0].token_ids


def _header(path) -> tuple[int, dict]:
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return 8 + length, json.loads(handle.read(length))


@pytest.mark.parametrize("layout", ["panels", "rows"])
def test_multi_head_untied_checkpoint_in_shards(tmp_path, layout):
    """Multi-head c_attn is reordered at load (q, k, v per head -> all q | all k | all v): its int8
    rows and their scales must move together (a panels folder stores them reordered, a rows folder
    as the source); an untied lm_head is quantized from its own weight."""
    source = write_hf_checkpoint(tmp_path / "mha", seed=4, multi_query=False, tie_word_embeddings=False,
                                 activation_function="gelu")
    output = write_quantized_checkpoint(source, tmp_path / "int8", max_shard_bytes=1 << 20, progress=False, layout=layout)
    assert (output / "model.safetensors.index.json").is_file() and len(find_weight_files(output)) > 1
    assert not (tmp_path / "int8.partial").exists()
    config = json.loads((output / "config.json").read_text())
    hidden, vocab = config["n_embd"], config["vocab_size"]
    shapes = {}
    for weight_file in find_weight_files(output):
        data_start, header = _header(weight_file.path)
        for name, info in header.items():
            if name != "__metadata__":
                shapes[name] = info["shape"]
                if layout == "panels" and not name.startswith("__padding__."):  # each tensor on a page of its file
                    assert (data_start + info["data_offsets"][0]) % 4096 == 0, name
    panels = -(-vocab // 16)
    assert shapes["lm_head.weight"] == ([panels, hidden, 16] if layout == "panels" else [vocab, hidden])
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == ([4 * hidden // 16, hidden, 16] if layout == "panels" else [4 * hidden, hidden])
    _assert_same_model(source, output, dtype=torch.float32)
    if layout == "rows":  # a rows folder (as written before the panels) rewritten in panels: the same model
        panels = write_quantized_checkpoint(output, tmp_path / "panels", max_shard_bytes=1 << 20, progress=False)
        assert json.loads((panels / "config.json").read_text())["quantization_config"]["weight_layout"] == "panels"
        _assert_same_model(source, panels, dtype=torch.float32)
        with pytest.raises(QuantizedCheckpointError, match="only a folder in rows can be rewritten, in panels"):
            write_quantized_checkpoint(output, tmp_path / "rows-again", progress=False, layout="rows")


@pytest.mark.skipif(not native.available() or not Path("/proc/self/maps").is_file(),
                    reason="the panels are kept as stored only with the native kernels; mappings read from Linux's /proc")
def test_a_panels_folder_is_used_where_it_lies(tiny_model_dir, tmp_path):
    """The int8 panels are views of the files mapped into memory (page-aligned, no copy, nothing
    packed), the same model bit for bit, and serving from them never writes to the files."""
    import hashlib

    output = write_quantized_checkpoint(tiny_model_dir, tmp_path / "int8", progress=False)
    digest = hashlib.sha256((output / "model.safetensors").read_bytes()).hexdigest()
    model = load_model(output, torch.bfloat16, torch.device("cpu"), progress=False)
    spans = mappings_of(output)
    packed = [module for module in model.modules() if isinstance(module, PackedLinear)]
    assert spans and len(packed) == 4 * model.config.n_layer + 1
    for module in packed:
        address = module.packed_weight.data_ptr()
        assert any(begin <= address < end for begin, end in spans) and address % 4096 == 0 and module.mapped_from_file
    _assert_same_model(tiny_model_dir, output)
    del model

    stored, built = LLM(str(output), device="cpu", progress=False), LLM(str(tiny_model_dir), device="cpu", quantize="int8", progress=False)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    for prompt in ("def f(x):", "import os"):
        assert stored.generate(prompt, params)[0].token_ids == built.generate(prompt, params)[0].token_ids
    assert hashlib.sha256((output / "model.safetensors").read_bytes()).hexdigest() == digest

    # a rows folder is read and packed in the process's own memory
    rows = write_quantized_checkpoint(tiny_model_dir, tmp_path / "rows", progress=False, layout="rows")
    model = load_model(rows, torch.bfloat16, torch.device("cpu"), progress=False)
    spans = mappings_of(rows)
    assert not any(begin <= module.packed_weight.data_ptr() < end for module in model.modules()
                   if isinstance(module, PackedLinear) for begin, end in spans)


def _shard_rss_and_pss_kib(folder) -> tuple[int, int]:
    rss = pss = 0
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's first line
                inside = len(fields) >= 6 and fields[5].startswith(str(folder))
            elif inside and fields[0] in ("Rss:", "Pss:"):
                rss, pss = (rss + int(fields[1]), pss) if fields[0] == "Rss:" else (rss, pss + int(fields[1]))
    return rss, pss


@pytest.mark.skipif(not native.available() or not Path("/proc/self/smaps").is_file(),
                    reason="the panels are mapped only with the native kernels; shares read from Linux's /proc")
def test_processes_serving_one_panels_folder_share_its_memory(tiny_model_dir, tmp_path):
    """Two processes that load the same panels folder hold its pages once between them (the page
    cache's): the weights' proportional share of this process's memory is half their size."""
    output = write_quantized_checkpoint(tiny_model_dir, tmp_path / "int8", progress=False)
    other = subprocess.Popen([sys.executable, "-c", "import sys, torch\nfrom pathlib import Path\n"
                              "from starchat.model.loader import load_model\n"
                              "model = load_model(Path(sys.argv[1]), torch.bfloat16, torch.device('cpu'), progress=False)\n"
                              "print('loaded', flush=True)\nsys.stdin.read()\n", str(output)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "loaded"
        model = load_model(output, torch.bfloat16, torch.device("cpu"), progress=False)
        rss, pss = _shard_rss_and_pss_kib(output)
        weight_kib = sum(m.packed_weight.numel() for m in model.modules() if isinstance(m, PackedLinear)) // 1024
        assert rss >= weight_kib and pss < 0.6 * rss, (rss, pss, weight_kib)
    finally:
        other.communicate("", timeout=60)
    assert other.returncode == 0


def test_panels_unpacked_without_the_native_kernels(tiny_model_dir, tmp_path, monkeypatch):
    """A GPU, or a CPU without the native kernels, unpacks the panels into the (N, K) int8 weights
    that quantizing while loading gives there."""
    output = write_quantized_checkpoint(tiny_model_dir, tmp_path / "int8", progress=False)
    monkeypatch.setattr(native, "available", lambda: False)
    built = load_model(tiny_model_dir, torch.float32, torch.device("cpu"), progress=False, quantize="int8")
    stored = load_model(output, torch.float32, torch.device("cpu"), progress=False)
    assert not any(isinstance(module, PackedLinear) for module in stored.modules())
    assert stored.transformer.h[0].mlp.c_fc.weight.shape == (4 * stored.config.n_embd, stored.config.n_embd)
    built_parameters, stored_parameters = dict(built.named_parameters()), dict(stored.named_parameters())
    assert built_parameters.keys() == stored_parameters.keys()
    for name, parameter in built_parameters.items():
        assert torch.equal(parameter, stored_parameters[name]), name


def test_bad_folders_get_one_clear_error(tiny_model_dir, tmp_path):
    output = write_quantized_checkpoint(tiny_model_dir, tmp_path / "int8", progress=False)
    with pytest.raises(QuantizedCheckpointError, match="already exists"):
        write_quantized_checkpoint(tiny_model_dir, output, progress=False)
    with pytest.raises(QuantizedCheckpointError, match="already quantized"):
        write_quantized_checkpoint(output, tmp_path / "again", progress=False)
    assert not (tmp_path / "again").exists() and not (tmp_path / "again.partial").exists()

    # another library's quantization: named in the error, never loaded as float weights
    config = json.loads((output / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (output / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizedCheckpointError, match="'gptq' is not a format starchat loads"):
        load_model(output, torch.bfloat16, torch.device("cpu"), progress=False)
    done = subprocess.run([sys.executable, "-m", "starchat.cli.main", "generate", "hi", "--model", str(output)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "gptq" in done.stderr and "Traceback" not in done.stderr

    # a layout this version does not know (a folder from a later one): named, with what to do
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "weight_layout": "tiles"}
    (output / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizedCheckpointError, match="weight_layout 'tiles' is not one starchat knows"):
        load_model(output, torch.bfloat16, torch.device("cpu"), progress=False)

    # a float weight where int8 belongs (a hand-edited folder): the tensor is named
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "weight_layout": "panels"}
    (output / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(output / "model.safetensors"))
    tensors["transformer.h.1.attn.c_proj.weight"] = tensors["transformer.h.1.attn.c_proj.weight"].float()
    save_file(tensors, str(output / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Exception, match=r"h\.1\.attn\.c_proj\.weight has dtype torch.float32, expected int8"):
        load_model(output, torch.bfloat16, torch.device("cpu"), progress=False)


def test_quantize_command_refuses_other_methods_and_existing_folders(tiny_model_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "starchat.cli.main", "quantize", str(tiny_model_dir), str(tmp_path / "x"),
                           "--method", "int4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "--method: only int8" in done.stderr and not (tmp_path / "x").exists()
    done = subprocess.run([sys.executable, "-m", "starchat.cli.main", "quantize", str(tiny_model_dir), str(tmp_path / "x"),
                           "--layout", "columns"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "--layout: one of panels, rows" in done.stderr and not (tmp_path / "x").exists()
    done = subprocess.run([sys.executable, "-m", "starchat.cli.main", "quantize", str(tiny_model_dir), str(tmp_path / "x"),
                           "--layout", "rows"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "(int8, rows)" in done.stdout
    assert json.loads((tmp_path / "x" / "config.json").read_text())["quantization_config"]["weight_layout"] == "rows"
    done = subprocess.run([sys.executable, "-m", "starchat.cli.main", "quantize", str(tiny_model_dir), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "already exists" in done.stderr


def test_training_refuses_a_quantized_checkpoint(tiny_model_dir, tmp_path):
    from starchat.train.model_setup import prepare_model

    output = write_quantized_checkpoint(tiny_model_dir, tmp_path / "int8", progress=False)
    with pytest.raises(ValueError, match="cannot be fine-tuned; train from the float checkpoint"):
        prepare_model(str(output), add_chat_tokens=False)


def test_older_checkpoints_mask_buffers_are_left_out(tiny_model_dir, tmp_path):
    """Older GPTBigCode checkpoints carry causal-mask buffers (`attn.bias`, bool; `attn.masked_bias`):
    not weights, skipped by the loader, and not written to the quantized folder."""
    import shutil

    from safetensors.torch import load_file, save_file

    source = tmp_path / "old"
    shutil.copytree(tiny_model_dir, source)
    tensors = load_file(str(source / "model.safetensors"))
    tensors["transformer.h.0.attn.bias"] = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    tensors["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    output = write_quantized_checkpoint(source, tmp_path / "int8", progress=False)
    assert not any(name.endswith(("attn.bias", "attn.masked_bias")) and "c_" not in name for name in _stored_dtypes(output))
    _assert_same_model(source, output)


def test_slow_int8_loads_say_how_to_start_faster(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """Quantizing while loading (or a rows folder) on a CPU, when slow, logs the command that makes
    starts fast; a panels folder does not."""
    from starchat.model import loader

    monkeypatch.setattr(loader, "SLOW_LOAD_SECONDS", -1.0)
    with caplog.at_level("INFO", logger="starchat.model.loader"):
        load_model(tiny_model_dir, torch.bfloat16, torch.device("cpu"), progress=False, quantize="int8")
    assert "quantized while loading" in caplog.text and "`starchat quantize`" in caplog.text
    caplog.clear()
    rows = write_quantized_checkpoint(tiny_model_dir, tmp_path / "rows", progress=False, layout="rows")
    panels = write_quantized_checkpoint(tiny_model_dir, tmp_path / "panels", progress=False)
    with caplog.at_level("INFO", logger="starchat.model.loader"):
        load_model(rows, torch.bfloat16, torch.device("cpu"), progress=False)
        assert "read and packed (int8 in rows)" in caplog.text
        caplog.clear()
        load_model(panels, torch.bfloat16, torch.device("cpu"), progress=False)
        assert "starchat" not in caplog.text
        load_model(tiny_model_dir, torch.bfloat16, torch.device("cpu"), progress=False)  # no int8 asked for
    assert "starchat quantize" not in caplog.text and "read and packed in" in caplog.text and "`starchat pack`" in caplog.text


def _vm_flags_of(folder) -> list[set[str]]:
    flags, inside = [], False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                inside = len(fields) >= 6 and fields[5].startswith(str(folder))
            elif inside and fields[0] == "VmFlags:":
                flags.append(set(fields[1:]))
    return flags


@pytest.mark.skipif(not native.available() or not Path("/proc/self/smaps").is_file(),
                    reason="the panels are mapped only with the native kernels; flags read from Linux's /proc")
@pytest.mark.parametrize("switch", ["1", "0"])
def test_mapped_panels_ask_for_huge_pages_unless_switched_off(tiny_model_dir, tmp_path, monkeypatch, switch):
    """MADV_HUGEPAGE over each mapped shard (VmFlags "hg") where huge pages are allowed; none with
    STARCHAT_HUGE_PAGES=0, the engine's switch."""
    from starchat.model.huge_pages import huge_pages_allowed

    monkeypatch.setenv("STARCHAT_HUGE_PAGES", switch)
    output = write_quantized_checkpoint(tiny_model_dir, tmp_path / "int8", progress=False)
    model = load_model(output, torch.bfloat16, torch.device("cpu"), progress=False)
    flags = _vm_flags_of(output)
    assert flags and model is not None
    assert all(("hg" in f) == huge_pages_allowed() for f in flags)
    if switch == "0":
        assert not any("hg" in f for f in flags)
