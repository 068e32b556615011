"""`starchat serve` as a real process: it loads, serves, and on SIGTERM finishes in-flight requests and exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def serve_process(tiny_model_dir):
    port = _free_port()
    command = [sys.executable, "-m", "starchat.cli.serve", "--model", str(tiny_model_dir), "--port", str(port),
               "--served-model-name", "tiny", "--kv-cache-memory-bytes", str(1 << 20), "--device", "cpu",
               "--log-format", "json", "--shutdown-grace", "20", "--no-prefix-caching"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if process.poll() is not None:
            raise AssertionError("starchat serve exited early:\n" + process.stderr.read())
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("starchat serve did not become healthy")
        time.sleep(0.1)
    yield process, url
    if process.poll() is None:
        process.kill()
        process.wait()


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(serve_process):
    process, url = serve_process
    # The flags reach the engine: with --no-prefix-caching a prompt sent twice is computed twice.
    repeated = {"model": "tiny", "prompt": "# a prompt of more than one cache block " * 8, "max_tokens": 1}
    usages = [httpx.post(url + "/v1/completions", json=repeated, timeout=60).json()["usage"] for _ in range(2)]
    assert usages[1]["prompt_tokens"] > 32 and usages[1]["prompt_tokens_details"]["cached_tokens"] == 0
    scored: dict = {}

    def score() -> None:
        body = {"input_data": {"input_string": ["def main():"], "parameters": {"max_new_tokens": 150}}}
        scored["response"] = httpx.post(url + "/score", json=body, timeout=60)

    stream_body = {"model": "tiny", "prompt": "import sys", "max_tokens": 150, "temperature": 0, "ignore_eos": True,
                   "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=stream_body, timeout=60,
                      headers={"x-request-id": "sigterm-test"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        worker = threading.Thread(target=score)
        worker.start()
        time.sleep(0.2)  # the scoring request is in flight too
        process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    worker.join(timeout=60)

    assert rest[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in rest[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] == "length"  # the whole answer, not cut off
    assert scored["response"].status_code == 200
    assert process.wait(timeout=60) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health")
    logs = [json.loads(line) for line in process.stderr.read().splitlines() if line.startswith("{")]
    assert any(entry.get("request_id") == "sigterm-test" and entry.get("status") == 200 for entry in logs)
    assert any("Shutting down" in entry["message"] for entry in logs)


def test_a_port_in_use_exits_1_saying_what_to_change(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "starchat.cli.serve", "--model", str(tiny_model_dir),
                                 "--port", str(port), "--device", "cpu", "--log-format", "json"],
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                                timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: cannot listen on 127.0.0.1:{port} (the reason is logged above); pass another --host or --port"
    assert any("address already in use" in json.loads(line)["message"].lower()
               for line in result.stderr.splitlines() if line.startswith("{"))
