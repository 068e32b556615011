"""Helpers for the server tests: a real uvicorn server in a thread, settings for tiny models, metrics parsing."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

from starchat.server.settings import ServerSettings


class RunningServer:
    def __init__(self, app, settings: ServerSettings):
        self.app = app
        self.settings = settings
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def start(self, wait_healthy: bool = True) -> "RunningServer":
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        while wait_healthy and httpx.get(self.url + "/health").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the model did not load: " + httpx.get(self.url + "/health").text)
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)

    @property
    def ctx(self):
        return self.app.state.ctx


def tiny_settings(model_dir) -> ServerSettings:
    # A small KV cache and batch keep the tests light on a shared CPU.
    return ServerSettings(model=str(model_dir), served_model_name="tiny", max_concurrent_requests=8, max_queue=8,
                          kv_cache_memory_bytes=1 << 20, device="cpu", dtype="float32")


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == wanted:
            return float(value)
    return 0.0
