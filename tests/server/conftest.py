"""Real servers for the API tests: uvicorn in a thread on a free loopback port, on tiny_model_dir.

One server loads the model through the app's own lifespan (the production path); tests that
need other settings (limits, keys, timeouts) start a second app that shares its engine.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from server_harness import RunningServer, tiny_settings

from starchat.server.app import create_app


@pytest.fixture(scope="session")
def server(tiny_model_dir):
    settings = tiny_settings(tiny_model_dir)
    running = RunningServer(create_app(settings), settings).start()
    yield running
    running.stop()


@pytest.fixture
def make_server(server):
    """Start an app with other settings that shares the session server's engine."""
    started = []

    def make(**changes) -> RunningServer:
        settings = replace(server.settings, **changes)
        running = RunningServer(create_app(settings, engine=server.ctx.engine), settings).start()
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()
