"""What every API shares: the engine's state, admission (429), prompt checks against the
limits, and running a generation with a deadline and latency metrics (streaming.py holds the
async plumbing: fan-in, disconnect watching, Server-Sent Events).

The APIs differ only in how they read parameters and write answers (serving_azureml.py,
serving_openai.py, serving_tgi.py); they never touch the model or the KV cache.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator

from starchat.engine.async_llm import AsyncLLM, EngineDeadError
from starchat.engine.engine import RequestError
from starchat.outputs import StreamDelta, TokenLogprob
from starchat.sampling_params import SamplingParams, SamplingParamsError
from starchat.server.errors import ApiError, bad_request
from starchat.server.metrics import ServerMetrics
from starchat.server.middleware import request_id_var
from starchat.server.settings import ServerSettings
from starchat.server.streaming import gather_or_cancel, until_disconnect

_LONG_PROMPT_CHARS = 20_000  # longer texts are tokenized off the event loop
RETRY_AFTER_SECONDS = 1
# The `model` TGI's clients put in Messages-API requests: TGI's documentation uses "tgi", and
# huggingface_hub's InferenceClient(base_url=...).chat_completion sends "dummy".
TGI_PLACEHOLDER_MODEL_NAMES = ("tgi", "dummy")


class RequestTimeout(Exception):
    """The generation ran past the request timeout; it has been cancelled."""


# ---- admission ------------------------------------------------------------------------------


class Lease:
    def __init__(self, admission: "Admission", slots: int):
        self._admission = admission
        self.slots = slots

    def release(self) -> None:
        if self.slots:
            self._admission.in_flight -= self.slots
            self.slots = 0


class Admission:
    """Bounded admission: at most max_running + max_queue generations in flight; then 429.

    The engine runs max_running sequences; the rest wait in its queue, which is therefore
    never longer than max_queue, so latency stays bounded instead of growing with the load.
    """

    def __init__(self, max_running: int, max_queue: int, metrics: ServerMetrics | None = None):
        self.capacity = max_running + max_queue
        self.in_flight = 0
        self.metrics = metrics

    def acquire(self, slots: int) -> Lease:
        if slots > self.capacity:
            raise bad_request(None, f"{slots} generations in one request exceed this server's capacity "
                                    f"of {self.capacity}; send fewer inputs (or smaller n)")
        if self.in_flight + slots > self.capacity:
            if self.metrics:
                self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, f"the server is at capacity ({self.capacity} generations in flight); "
                                f"retry in {RETRY_AFTER_SECONDS} s", kind="overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.in_flight += slots
        return Lease(self, slots)


# ---- the engine and its limits --------------------------------------------------------------


@dataclass(frozen=True)
class FieldNames:
    """How one API names the engine's fields in its error messages, and its bad-input status."""

    prompt: str
    mapping: dict[str, str] = field(default_factory=dict)
    status: int = 400

    def name(self, engine_field: str) -> str:
        if engine_field == "prompt":
            return self.prompt
        return self.mapping.get(engine_field, engine_field)

    def error(self, engine_field: str, message: str) -> ApiError:
        return bad_request(self.name(engine_field), message, status=self.status)


@dataclass
class Prepared:
    """A checked generation: token ids and parameters the engine accepts."""

    prompt_token_ids: list[int]
    params: SamplingParams


class ServingContext:
    def __init__(self, settings: ServerSettings, metrics: ServerMetrics):
        self.settings = settings
        self.metrics = metrics
        self.admission = Admission(settings.max_concurrent_requests, settings.max_queue, metrics)
        self.engine: AsyncLLM | None = None
        self.load_error: str | None = None
        self.started_at = time.time()

    # ---- state ----

    def ready_engine(self) -> AsyncLLM:
        engine = self.engine
        if engine is None:
            message = f"the model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise ApiError(503, message, kind="unavailable", headers={"Retry-After": "5"})
        if not engine.is_alive():
            raise ApiError(503, "the engine loop is not running; restart the server", kind="unavailable")
        return engine

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name or (self.engine.model_name if self.engine else self.settings.model_name)

    def accepts_model(self, name: str | None) -> bool:
        """The served name, the model's own name (a path or Hub id), no name at all, or the
        placeholder a TGI client sends (TGI serves one model and ignores the name)."""
        if name is None or name == self.model_name or name in TGI_PLACEHOLDER_MODEL_NAMES:
            return True
        return self.engine is not None and name == self.engine.model_name

    @property
    def max_total_tokens(self) -> int:
        engine = self.ready_engine()
        return min(self.settings.max_total_tokens or engine.max_model_len, engine.max_model_len)

    @property
    def max_input_tokens(self) -> int:
        return min(self.settings.max_input_tokens or self.max_total_tokens - 1, self.max_total_tokens - 1)

    def engine_stats(self):
        engine = self.engine
        return engine.stats() if engine is not None and engine.is_alive() else None

    # ---- checking a request ----

    async def tokenize(self, prompt: str | list[int], names: FieldNames) -> list[int]:
        engine = self.ready_engine()
        if not isinstance(prompt, str):
            return list(prompt)
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # JSON allows lone surrogates ("\ud800"); text cannot hold them
            raise names.error("prompt", "is not valid Unicode text (it holds a lone surrogate escape)") from None
        if len(prompt) > _LONG_PROMPT_CHARS:
            return await asyncio.to_thread(engine.tokenizer.encode, prompt)
        return engine.tokenizer.encode(prompt)

    async def prepare(self, prompt: str | list[int], params: SamplingParams, names: FieldNames, *,
                      default_max_new_tokens: int | None = None, max_new_tokens_given: bool = True,
                      truncate: int | None = None) -> Prepared:
        """Tokenize and check against the limits; a default max_new_tokens is fitted to the room left."""
        engine = self.ready_engine()
        token_ids = await self.tokenize(prompt, names)
        if truncate is not None and len(token_ids) > truncate:
            token_ids = token_ids[-truncate:]
        if not token_ids:
            raise names.error("prompt", "is empty; give at least one token of text")
        if len(token_ids) > self.max_input_tokens:
            raise names.error("prompt", f"has {len(token_ids)} tokens, more than the limit of {self.max_input_tokens} "
                                        "input tokens; shorten it")
        room = self.max_total_tokens - len(token_ids)
        if not max_new_tokens_given:
            wanted = room if default_max_new_tokens is None else default_max_new_tokens
            params = params.copy(max_new_tokens=max(1, min(wanted, room)))
        elif isinstance(params.max_new_tokens, int) and params.max_new_tokens > room:
            raise names.error("max_new_tokens", f"{params.max_new_tokens} new tokens do not fit: the prompt has "
                                                f"{len(token_ids)} tokens and at most {self.max_total_tokens} "
                                                f"tokens are allowed in all, so at most {room}")
        try:
            token_ids = engine.check(token_ids, params)
        except (RequestError, SamplingParamsError) as error:
            raise names.error(error.field, error.message) from None
        return Prepared(token_ids, params)

    # ---- running ----

    async def stream(self, prepared: Prepared, arrival: float, deadline: float) -> AsyncIterator[StreamDelta]:
        """Deltas of one generation; records latency metrics; RequestTimeout past the deadline.

        Leaving the iteration early (disconnect, error) cancels the generation in the engine.
        """
        engine = self.ready_engine()
        engine_request_id = f"{request_id_var.get() or 'req'}-{uuid.uuid4().hex[:8]}"
        loop = asyncio.get_running_loop()
        timed_out = False

        def on_deadline():
            nonlocal timed_out
            timed_out = True
            engine.abort(engine_request_id)  # also reaches a request still queued in the engine

        timer = loop.call_at(loop.time() + max(0.0, deadline - time.perf_counter()), on_deadline)
        metrics = self.metrics
        last_token_at = None
        finish_reason = "error"
        try:
            async with aclosing(engine.generate(prepared.prompt_token_ids, prepared.params, engine_request_id)) as deltas:
                async for delta in deltas:
                    if timed_out:
                        finish_reason = "timeout"
                        raise RequestTimeout()
                    if delta.token_ids:
                        now = time.perf_counter()
                        if last_token_at is None:
                            metrics.time_to_first_token.observe(now - arrival)
                        else:
                            metrics.inter_token_latency.observe(now - last_token_at)
                        last_token_at = now
                    if delta.finished:
                        finish_reason = delta.finish_reason or "stop"
                        metrics.prompt_tokens.inc(delta.num_prompt_tokens)
                        metrics.generation_tokens.inc(delta.num_generated_tokens)
                        metrics.e2e_latency.observe(time.perf_counter() - arrival)
                    yield delta
        except EngineDeadError as error:
            raise ApiError(503, f"the engine stopped: {error}", kind="unavailable") from None
        except RuntimeError as error:  # the engine failed this batch; it keeps serving others
            raise ApiError(500, str(error), kind="internal") from None
        except (asyncio.CancelledError, GeneratorExit):  # the client left, or a sibling generation failed
            finish_reason = "abort"
            raise
        finally:
            timer.cancel()
            metrics.finished.labels(finish_reason).inc()

    async def generate(self, prepared: Prepared, arrival: float, deadline: float) -> "Generated":
        """One whole generation (non-streaming)."""
        result = Generated(num_prompt_tokens=len(prepared.prompt_token_ids))
        async with aclosing(self.stream(prepared, arrival, deadline)) as deltas:
            async for delta in deltas:
                result.add(delta)
        return result

    def deadline(self, arrival: float) -> float:
        return arrival + self.settings.request_timeout

    async def run_to_completion(self, receive, prepared: list[Prepared], arrival: float) -> list["Generated"]:
        """Run generations together under one admission lease; cancel all if the client leaves.

        Raises ApiError(429) when the queue is full, RequestTimeout, ClientDisconnected.
        """
        lease = self.admission.acquire(len(prepared))
        deadline = self.deadline(arrival)
        try:
            work = gather_or_cancel([self.generate(job, arrival, deadline) for job in prepared])
            return await until_disconnect(receive, work)
        finally:
            lease.release()


@dataclass
class Generated:
    num_prompt_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    seed: int | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def add(self, delta: StreamDelta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs:
            self.logprobs += delta.logprobs
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.finished:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason
            self.seed = delta.seed
            self.num_cached_tokens = delta.num_cached_tokens
