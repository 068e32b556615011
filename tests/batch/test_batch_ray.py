"""`--ray`: the same job through Ray Data on a local loopback cluster gives the same predictions."""

from __future__ import annotations

import os

import pytest

from batch_helpers import engine, one_torch_thread, prompts, write_notebook_csvs, write_jsonl  # noqa: F401
from starchat.batch import run_batch

if os.environ.get("CI"):  # CI installs the ray extra: there a missing ray is a failure, not a skip
    import ray
else:
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def test_ray_run_gives_the_same_predictions_as_a_local_run(tmp_path, engine, tiny_model_dir, local_cluster):
    write_notebook_csvs(tmp_path / "in", prompts(23))
    write_jsonl(tmp_path / "in" / "bad.jsonl", ['{"input_string": ', {"input_string": "def ok():"}])
    parameters = {"max_new_tokens": 4}

    local = run_batch(tmp_path / "in", tmp_path / "local", engine=engine, parameters=parameters, progress="none")
    on_ray = run_batch(tmp_path / "in", tmp_path / "ray", model=str(tiny_model_dir), dtype="float32",
                       parameters=parameters, max_concurrency=4, mini_batch_size=5, ray=True, progress="none")

    assert (on_ray.status, on_ray.rows_ok, on_ray.rows_failed) == ("completed", 24, 1)
    assert (local.status, local.rows_ok, local.rows_failed) == ("completed", 24, 1)
    for name in ("predictions.csv", "errors.jsonl"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert on_ray.tokens_out == local.tokens_out
