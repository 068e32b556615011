"""An engine built and stepped in one background thread.

Servers (AsyncLLM) and Ray's batch actors step the engine in a thread of their own. On a CPU
the native kernels' OpenMP threads belong to the thread that starts a parallel region: libgomp
keeps one team per such thread. An engine built (packed, warmed up) in one thread and stepped in
another leaves two teams alive on the machine's cores, and with more OpenMP threads than cores
libgomp cuts its waits at barriers to a few spins before sleeping, so every barrier of a step
paid for a wake-up: on the 2-core Xeon tiny_starcoder decoded at 18.7-20.2 ms a token from a
second thread against 12.2-12.8 from the thread that built it, and 12.2-12.5 built and stepped
in a thread of its own (`bench/engine_thread.py`, docs/PERFORMANCE.md). Building the engine in
the thread that steps it keeps one team.
"""

from __future__ import annotations

import threading
from typing import Callable

from starchat.engine.engine import LLMEngine


def start_engine_thread(build: Callable[[], LLMEngine], run: Callable[[LLMEngine], None],
                        name: str = "starchat-engine") -> tuple[LLMEngine, threading.Thread]:
    """Start a daemon thread that builds the engine (`build()`) and then runs `run(engine)`.
    Returns once the engine is built, with it and the thread; re-raises what `build` raised."""
    built: list[LLMEngine] = []
    failure: list[BaseException] = []
    ready = threading.Event()

    def main() -> None:
        try:
            built.append(build())
        except BaseException as error:  # handed to the caller, who decides
            failure.append(error)
            return
        finally:
            ready.set()
        run(built[0])

    thread = threading.Thread(target=main, name=name, daemon=True)
    thread.start()
    ready.wait()
    if failure:
        raise failure[0]
    return built[0], thread
