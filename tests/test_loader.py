"""Checkpoint resolution and one-line errors for broken checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest

from starchat import LLM, SamplingParams
from starchat.config import ModelConfigError
from starchat.model.loader import CheckpointError, resolve_model_dir

PARAMS = SamplingParams(max_new_tokens=6, ignore_eos=True)


def copy_model(source, target):
    shutil.copytree(source, target)
    return target


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_missing_weights(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    (model / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as error:
        LLM(str(model), progress=False)
    assert "no weights" in one_line(error) and str(model) in str(error.value)


def test_wrong_model_type(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(ModelConfigError) as error:
        LLM(str(model), progress=False)
    assert "model_type is 'llama'" in one_line(error) and "config.json" in str(error.value)


def test_shape_mismatch_names_tensor_and_file(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"n_inner": 128}))
    with pytest.raises(CheckpointError) as error:
        LLM(str(model), progress=False)
    text = one_line(error)
    assert "mlp.c_fc" in text and "model.safetensors" in text and "shape" in text


def test_truncated_shard(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError) as error:
        LLM(str(model), progress=False)
    assert "model.safetensors" in one_line(error) and "re-download" in str(error.value)


def test_missing_config(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    (model / "config.json").unlink()
    with pytest.raises(CheckpointError) as error:
        LLM(str(model), progress=False)
    assert "config.json" in one_line(error)


def test_azureml_model_dir_is_honoured(tiny_model_dir, tmp_path, monkeypatch):
    # Azure ML mounts the registered model a folder or two below AZUREML_MODEL_DIR.
    copy_model(tiny_model_dir, tmp_path / "azureml" / "starchat" / "1")
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(tmp_path / "azureml"))
    assert resolve_model_dir(None) == tmp_path / "azureml" / "starchat" / "1"


def test_hub_id_resolves_from_the_local_cache_offline(tiny_model_dir, tmp_path, monkeypatch):
    """A Hub id is looked up in the huggingface_hub cache first: no network needed once downloaded."""
    cache = tmp_path / "hub"
    repo = cache / "models--bigcode--tiny-test"
    revision = "0123456789abcdef0123456789abcdef01234567"
    copy_model(tiny_model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model_dir("bigcode/tiny-test") == repo / "snapshots" / revision
    assert LLM("bigcode/tiny-test", dtype="float32", progress=False).generate(["def"], PARAMS)[0].finish_reason == "length"


def test_unknown_hub_id_offline_is_one_clear_line(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError) as error:
        resolve_model_dir("nobody/no-such-model")
    assert "nobody/no-such-model" in one_line(error)
