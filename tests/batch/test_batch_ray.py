"""`--ray`: the same job through Ray Data on a local loopback cluster gives the same predictions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch_helpers import engine, one_torch_thread, prompts, write_notebook_csvs, write_jsonl  # noqa: F401
from starchat.batch import run_batch

REPO = Path(__file__).resolve().parents[2]

if os.environ.get("CI"):  # CI installs the ray extra: there a missing ray is a failure, not a skip
    import ray
else:
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")


def test_an_address_where_no_cluster_answers_fails_at_once_saying_what_to_do(tmp_path):
    # First in the file: the tests after it hold `local_cluster`, and a process already connected
    # to Ray runs there whatever the address.
    from starchat.batch.ray_runner import RayClusterError

    write_notebook_csvs(tmp_path / "in", prompts(3))
    started = time.monotonic()
    with pytest.raises(RayClusterError, match=r"--ray 127.0.0.1:1: no Ray cluster answers there .*ray start --head"):
        run_batch(tmp_path / "in", tmp_path / "out", ray="127.0.0.1:1", progress="none")
    assert time.monotonic() - started < 30  # Ray alone retries such an address for minutes
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["status"], summary["rows_pending"]) == ("failed", 3)


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


def test_cli_joins_a_running_cluster_a_sigterm_interrupts_and_the_same_command_resumes(
        tmp_path, engine, tiny_model_dir, local_cluster):
    """The job joins the cluster by its address (another driver, as on a real cluster); SIGTERM (a
    scheduler's stop) must end it as an interruption, not by Ray's own handler's exit."""
    rows = prompts(200)
    write_notebook_csvs(tmp_path / "in", rows)
    address = ray.get_runtime_context().gcs_address
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "starchat.cli.main", "batch", str(tmp_path / "in"), "--output", str(output_dir),
               "--model", str(tiny_model_dir), "--dtype", "float32", "--parameters", '{"max_new_tokens": 4}',
               "--max-concurrency", "4", "--mini-batch-size", "5", "--ray", address]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    job = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    journal = output_dir / ".starchat-batch" / "results.jsonl"
    deadline = time.monotonic() + 240
    while job.poll() is None and time.monotonic() < deadline and (
            not journal.exists() or journal.read_bytes().count(b"\n") < 5):
        time.sleep(0.05)
    assert job.poll() is None, job.communicate()[0].decode()[-3000:]
    job.send_signal(signal.SIGTERM)
    output = job.communicate(timeout=120)[0].decode()
    assert job.returncode == 130, output[-3000:]
    interrupted = json.loads((output_dir / "summary.json").read_text())
    assert interrupted["status"] == "interrupted" and 0 < interrupted["rows_ok"] < 200, interrupted

    resumed = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((output_dir / "summary.json").read_text())
    assert (summary["status"], summary["rows_ok"], summary["rows_skipped"]) == (
        "completed", 200, interrupted["rows_ok"])
    run_batch(tmp_path / "in", tmp_path / "local", engine=engine, parameters={"max_new_tokens": 4}, progress="none")
    assert (output_dir / "predictions.csv").read_bytes() == (tmp_path / "local" / "predictions.csv").read_bytes()
