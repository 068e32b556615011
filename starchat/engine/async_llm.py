"""The engine for servers: a background thread runs the step loop; callers await token deltas.

Torch kernels release the GIL, so the event loop stays responsive while a step runs. Requests
and cancellations enter through a thread-safe inbox and take effect before the next step;
deltas go back to each caller's asyncio queue. A caller that stops iterating (a client that
disconnects) cancels its request, which frees its cache blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import AsyncIterator

from starchat.config import EngineConfig
from starchat.engine.engine import EngineStats, LLMEngine
from starchat.engine.engine_thread import start_engine_thread
from starchat.outputs import StreamDelta
from starchat.sampling_params import SamplingParams

logger = logging.getLogger("starchat.engine")


class EngineDeadError(RuntimeError):
    """The engine loop stopped; no request can be served until the process restarts."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class _Abort:
    request_id: str


class AsyncLLM:
    def __init__(self, config: EngineConfig | None = None, progress: bool = True, engine: LLMEngine | None = None):
        """Loads the model (unless `engine` is given) in the engine thread, which then steps it:
        one thread for both keeps one team of OpenMP threads on a CPU (engine_thread.py)."""
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams_lock = threading.Lock()
        self._stopping = threading.Event()
        self.engine, self._thread = start_engine_thread(lambda: engine or LLMEngine(config, progress=progress), self._loop)
        self._stats = self.engine.stats()

    # ---- what callers read ----------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def chat_template(self):
        return self.engine.chat_template

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def stats(self) -> EngineStats:
        return self._stats

    def chat_request(self, messages: list[dict], params: SamplingParams | None = None, system: str | None = None):
        return self.engine.chat_request(messages, params, system)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.engine.chat_prompt(messages, add_generation_prompt=add_generation_prompt)

    def check(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Validate without queueing: the prompt's token ids, or RequestError/SamplingParamsError."""
        prompt_token_ids = self.engine.tokenize_prompt(prompt)
        self.engine.check_request(prompt_token_ids, params)
        return prompt_token_ids

    # ---- generation -----------------------------------------------------------------------

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[StreamDelta]:
        """Deltas of one request until the finished one. Closing the iterator cancels the request."""
        if not self.is_alive():
            raise EngineDeadError("the engine loop is not running")
        params = params or SamplingParams()
        prompt_token_ids = self.check(prompt, params)
        request_id = request_id or uuid.uuid4().hex
        deltas: asyncio.Queue = asyncio.Queue()
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"request_id: {request_id} is already running")
            self._streams[request_id] = (asyncio.get_running_loop(), deltas)
        self._send(_Add(request_id, prompt_token_ids, params))
        finished = False
        try:
            while True:
                item = await deltas.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._streams_lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._send(_Abort(request_id))

    def abort(self, request_id: str) -> None:
        self._send(_Abort(request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wakeup.set()
        self._thread.join(timeout)

    # ---- the engine thread ----------------------------------------------------------------

    def _send(self, command) -> None:
        self._inbox.put(command)
        self._wakeup.set()

    def _loop(self, engine: LLMEngine) -> None:
        while not self._stopping.is_set():
            outputs: list[tuple[str, object]] = []
            self._drain_inbox(engine, outputs)
            if engine.has_unfinished_requests():
                try:
                    outputs.extend((delta.request_id, delta) for delta in engine.step())
                except Exception as error:  # keep serving: fail the batch, not the server
                    logger.exception("engine step failed; cancelling the running requests")
                    for request_id in engine.request_ids():
                        engine.abort_request(request_id)
                        outputs.append((request_id, RuntimeError(f"generation failed: {error}")))
            self._stats = engine.stats()
            self._deliver(outputs)
            if not engine.has_unfinished_requests() and self._inbox.empty():
                self._wakeup.wait(timeout=1.0)
                self._wakeup.clear()
        self._fail_all(EngineDeadError("the server is shutting down"))

    def _drain_inbox(self, engine: LLMEngine, outputs: list) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                with self._streams_lock:
                    wanted = command.request_id in self._streams
                if not wanted:  # cancelled before it started
                    continue
                try:
                    engine.add_request(command.prompt_token_ids, command.params, command.request_id)
                except Exception as error:
                    outputs.append((command.request_id, error))
            else:
                delta = engine.abort_request(command.request_id)
                if delta is not None:
                    outputs.append((command.request_id, delta))

    def _deliver(self, outputs: list[tuple[str, object]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        with self._streams_lock:
            for request_id, item in outputs:
                stream = self._streams.get(request_id)
                if stream is not None:
                    by_loop[stream[0]].append((stream[1], item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: its callers are gone
                pass

    def _fail_all(self, error: BaseException) -> None:
        with self._streams_lock:
            outputs = [(request_id, error) for request_id in self._streams]
        self._deliver(outputs)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for deltas, item in items:
        deltas.put_nowait(item)
