"""The on-disk store of decode-product choices (model/tuning_cache.py). How tuning uses it, with
the kernels under Triton's interpreter, is in tests/test_triton_linear.py; on a GPU in
tests/test_cuda.py."""

from __future__ import annotations

import json

import torch

from starchat.model import tuning_cache

CPU = torch.device("cpu")
KEY = tuning_cache.layer_key(torch.bfloat16, 6400, 6144, True, False)
REPORT = [{"shape": (6400, 6144), "weight_dtype": "torch.bfloat16", "rows": 1, "gelu_epilogue": False,
           "kernel_us": 22.9, "blocks": (1, 32, 256, 4, 1), "cublas_us": 23.7, "chosen": "triton"}]


def test_choices_come_back_as_they_were_stored(tmp_path):
    cache = tuning_cache.TuningCache(CPU, torch.bfloat16, tmp_path)
    assert cache.get(KEY) is None
    cache.put(KEY, {1: (1, 32, 256, 4, 1), 16: None}, REPORT)
    cache.save()
    again = tuning_cache.TuningCache(CPU, torch.bfloat16, tmp_path)
    assert again.path == cache.path
    assert again.get(KEY) == {"choices": {1: (1, 32, 256, 4, 1), 16: None}, "report": REPORT}
    # another activation dtype is another environment, so another file
    assert tuning_cache.TuningCache(CPU, torch.float16, tmp_path).get(KEY) is None


def test_two_processes_saving_keep_both_entries(tmp_path):
    first = tuning_cache.TuningCache(CPU, torch.bfloat16, tmp_path)
    second = tuning_cache.TuningCache(CPU, torch.bfloat16, tmp_path)  # opened before the first saved
    first.put(KEY, {1: None}, [])
    first.save()
    other = tuning_cache.layer_key(torch.int8, 49156, 6144, False, False)
    second.put(other, {1: (16, 32, 512, 8)}, [])
    second.save()
    stored = tuning_cache.TuningCache(CPU, torch.bfloat16, tmp_path)
    assert stored.get(KEY)["choices"] == {1: None} and stored.get(other)["choices"] == {1: (16, 32, 512, 8)}


def test_a_foreign_or_broken_file_is_not_used_and_a_write_failure_is_only_logged(tmp_path, caplog):
    cache = tuning_cache.TuningCache(CPU, torch.bfloat16, tmp_path)
    cache.path.parent.mkdir(parents=True, exist_ok=True)
    cache.path.write_text(json.dumps({"environment": {"gpu": "another"}, "layers": {KEY: {"choices": {"1": None},
                                                                                            "report": []}}}))
    with caplog.at_level("WARNING", logger="starchat.model"):
        assert tuning_cache.TuningCache(CPU, torch.bfloat16, tmp_path).get(KEY) is None
    assert "does not hold this environment" in caplog.text
    cache.path.write_text(json.dumps({"environment": cache.environment, "layers": {KEY: {"choices": [1, 2]}}}))
    assert tuning_cache.TuningCache(CPU, torch.bfloat16, tmp_path).get(KEY) is None  # an entry in another layout

    blocked = tmp_path / "a file"
    blocked.write_text("")
    unwritable = tuning_cache.TuningCache(CPU, torch.bfloat16, blocked)  # its folder would be below a file
    unwritable.put(KEY, {1: None}, [])
    with caplog.at_level("WARNING", logger="starchat.model"):
        unwritable.save()
    assert "could not write the tuning cache" in caplog.text
