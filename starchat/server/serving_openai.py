"""OpenAI `/v1/models`, `/v1/completions` and `/v1/chat/completions`, whole or streamed (SSE)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import AsyncIterator

from fastapi import Request

from starchat.chat_template import ChatFormatError, fim_prompt
from starchat.outputs import TokenLogprob
from starchat.sampling_params import GuidedDecoding, SamplingParams, SamplingParamsError
from starchat.server.errors import ApiError, bad_request, error_body
from starchat.server.protocol_openai import ChatCompletionRequest, CompletionRequest, _SamplingFields, template_messages
from starchat.server.serving import FieldNames, Generated, Prepared, RequestTimeout, ServingContext
from starchat.openai_format import best_of_order, chat_logprobs, completion_logprobs, echoed_prompt_logprobs
from starchat.structured_output import GUIDED_FIELDS, guided_from_openai
from starchat.tool_calls import ToolCalling, add_system_note, new_call_id, tool_call, tool_calling_from_openai
from starchat.server.streaming import EventStreamResponse, merge_streams

logger = logging.getLogger("starchat.server")

MAX_STOP_SEQUENCES = 16
_ENGINE_NAMES = {"min_new_tokens": "min_tokens", "stop_token_ids": "stop_token_ids"}


def models(ctx: ServingContext) -> dict:
    return {"object": "list", "data": [{
        "id": ctx.model_name, "object": "model", "created": int(ctx.started_at), "owned_by": "starchat",
        "root": ctx.engine.model_name if ctx.engine else ctx.model_name,
        "max_model_len": ctx.max_total_tokens if ctx.engine else None,
    }]}


def timeout_error(ctx: ServingContext) -> ApiError:
    return ApiError(408, f"the generation took longer than the request timeout of {ctx.settings.request_timeout:g} s "
                         "and was cancelled", kind="timeout")


def _check_common(ctx: ServingContext, body: _SamplingFields, num_prompts: int, candidates: int | None = None) -> None:
    """`candidates`: completions generated per prompt (best_of, when more than n)."""
    if not ctx.accepts_model(body.model):
        raise ApiError(404, f"model: {body.model!r} is not served here; this server serves {ctx.model_name!r}",
                       kind="not_found", field="model", code="model_not_found")
    for key in body.logit_bias or {}:
        if not key.strip().isdigit():
            raise bad_request("logit_bias", f"keys are token ids (integers as strings), got {key!r}")
    if isinstance(body.stop, list) and len(body.stop) > MAX_STOP_SEQUENCES:
        raise bad_request("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(body.stop)}")
    limit = ctx.settings.max_inputs_per_request
    count, name = (body.n, "n") if candidates is None or candidates <= body.n else (candidates, "best_of")
    if num_prompts * count > limit:
        raise bad_request(name, f"{num_prompts} prompt(s) x {name}={count} is more than the limit of {limit} "
                                "completions per request")


def _guided(body: _SamplingFields) -> tuple[GuidedDecoding | None, str]:
    """The structured-output constraint and the field that asked for it (at most one may)."""
    fields = body.model_dump(include=set(GUIDED_FIELDS), by_alias=True, exclude_none=True)
    try:
        return guided_from_openai(fields)
    except SamplingParamsError as error:
        raise bad_request(error.field, error.message) from None


def _tool_calling(body: ChatCompletionRequest) -> ToolCalling | None:
    """The tool calls the reply must be (tool_choice "required" or a named function), else None."""
    fields = body.model_dump(include={"tools", "tool_choice", "parallel_tool_calls"}, exclude_none=True)
    try:
        return tool_calling_from_openai(fields)
    except SamplingParamsError as error:
        raise bad_request(error.field, error.message) from None


def _params(body: _SamplingFields, max_tokens: int | None, logprobs: int | None,
            guided: GuidedDecoding | None) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI samples by default
    return SamplingParams(
        guided=guided, max_new_tokens=max_tokens or 16, min_new_tokens=body.min_tokens, temperature=temperature,
        top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p, min_p=body.min_p or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias={int(key): bias for key, bias in (body.logit_bias or {}).items()},
        do_sample=temperature > 0, seed=body.seed,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        stop_token_ids=list(body.stop_token_ids or []), logprobs=logprobs, ignore_eos=body.ignore_eos,
    )


def _fan_out(job: Prepared, n: int) -> list[Prepared]:
    """n samples of one prompt; with a seed, sample i uses seed + i so that they differ."""
    if n == 1:
        return [job]
    seed = job.params.seed
    return [Prepared(job.prompt_token_ids, job.params.copy(seed=None if seed is None else seed + i)) for i in range(n)]


def _best(results: list[Generated], best_of: int, n: int) -> list[int]:
    """Indices of the n best of each prompt's best_of candidates (consecutive in `results`), by
    OpenAI's rule: the highest log-probability per token; the order of sampling among equals."""
    picked = []
    for first in range(0, len(results), best_of):
        if best_of == n:
            picked += range(first, first + n)
        else:
            picked += [first + i for i in best_of_order([r.logprobs for r in results[first:first + best_of]])[:n]]
    return picked


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """`cached_tokens`: prompt tokens the prefix cache had computed before (OpenAI's name)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _stream_error(error: Exception, ctx: ServingContext) -> str:
    if isinstance(error, RequestTimeout):
        error = timeout_error(ctx)
    elif not isinstance(error, ApiError):
        logger.exception("generation failed mid-stream", exc_info=error)
        error = ApiError(500, f"generation failed: {error}", kind="internal")
    return _sse(error_body("openai", error)) + "data: [DONE]\n\n"


# ---- /v1/completions ------------------------------------------------------------------------


def _prompt_logprobs(ctx: ServingContext, prompt_token_ids: list[int], scored: list[TokenLogprob | None]) -> dict:
    """The prompt's tokens as echoed: the first has no log-probability (None), as OpenAI's."""
    token_text = ctx.ready_engine().tokenizer.token_text
    return echoed_prompt_logprobs([token_text(token_id) for token_id in prompt_token_ids], scored)


async def completions(ctx: ServingContext, body: CompletionRequest, request: Request):
    arrival = time.perf_counter()
    engine = ctx.ready_engine()
    prompts = body.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise bad_request("prompt", "is empty; give a text, a list of texts or token ids")
    best_of = body.n if body.best_of is None else body.best_of
    _check_common(ctx, body, len(prompts), candidates=best_of)
    if best_of < body.n:
        raise bad_request("best_of", f"must be at least n ({body.n}), got {best_of}")
    if best_of > body.n and body.stream:
        raise bad_request("best_of", "the best of several completions cannot be streamed; leave best_of out or equal to n")
    if body.suffix is not None and not all(isinstance(p, str) for p in prompts):
        raise bad_request("suffix", "needs text prompts (fill-in-the-middle is built from text)")
    score_prompt = body.echo and body.logprobs is not None
    if score_prompt and body.suffix is not None:
        raise bad_request("echo", "echo with logprobs scores the prompt as given; it cannot be combined with suffix")
    guided, guided_field = _guided(body)
    # Ranking candidates needs their tokens' log-probabilities, returned only when asked for.
    params = _params(body, body.max_tokens, body.logprobs if body.logprobs is not None or best_of == body.n else 0,
                     guided)
    if score_prompt:  # the echoed prompt comes with its tokens' log-probabilities
        params.prompt_logprobs = body.logprobs
    names = FieldNames("prompt", {**_ENGINE_NAMES, "max_new_tokens": "max_tokens", "guided": guided_field})
    jobs: list[Prepared] = []
    echoes: list[str] = []
    for index, prompt in enumerate(prompts):
        text = fim_prompt(prompt, body.suffix) if body.suffix is not None else prompt
        job_names = names if len(prompts) == 1 else FieldNames(f"prompt[{index}]", names.mapping)
        job = await ctx.prepare(text, params, job_names, max_new_tokens_given=body.max_tokens is not None)
        jobs += _fan_out(job, best_of)
        if body.echo:
            echo = prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt)
            echoes += [echo] * best_of
    response_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        lease = ctx.admission.acquire(len(jobs))
        events = _completion_events(ctx, body, jobs, echoes, response_id, created, arrival)
        return EventStreamResponse(events, on_close=lease.release)
    try:
        results = await ctx.run_to_completion(request.receive, jobs, arrival)
    except RequestTimeout:
        raise timeout_error(ctx) from None
    choices = []
    for index, picked in enumerate(_best(results, best_of, body.n)):
        result = results[picked]
        echo = echoes[picked] if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            prompt = _prompt_logprobs(ctx, jobs[picked].prompt_token_ids, result.prompt_logprobs) if body.echo else None
            logprobs = completion_logprobs(result.logprobs, len(echo), prompt)
        choices.append({"index": index, "text": echo + result.text, "logprobs": logprobs,
                        "finish_reason": result.finish_reason})
    # The samples of a prompt count it once, with the cached tokens of its first sample; every
    # candidate's tokens count (as OpenAI bills best_of).
    prompt_tokens = sum(len(job.prompt_token_ids) for job in jobs[::best_of])
    cached_tokens = sum(result.num_cached_tokens for result in results[::best_of])
    return {"id": response_id, "object": "text_completion", "created": created, "model": ctx.model_name,
            "choices": choices, "usage": _usage(prompt_tokens, sum(len(r.token_ids) for r in results), cached_tokens)}


async def _completion_events(ctx: ServingContext, body: CompletionRequest, jobs: list[Prepared], echoes: list[str],
                             response_id: str, created: int, arrival: float) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = {"id": response_id, "object": "text_completion", "created": created, "model": ctx.model_name}
    extra = {"usage": None} if include_usage else {}
    offsets = [len(echo) for echo in echoes] if echoes else [0] * len(jobs)
    completion_tokens = 0
    cached_tokens = [0] * len(jobs)
    # With logprobs, an echo waits for its prompt's log-probabilities (in the first delta).
    echo_later = bool(echoes) and body.logprobs is not None
    try:
        for index, echo in enumerate(echoes if not echo_later else []):
            yield _sse({**base, "choices": [{"index": index, "text": echo, "logprobs": None, "finish_reason": None}],
                        **extra})
        deadline = ctx.deadline(arrival)
        async for index, delta in merge_streams([ctx.stream(job, arrival, deadline) for job in jobs]):
            if echo_later and delta.prompt_logprobs is not None:
                prompt = _prompt_logprobs(ctx, jobs[index].prompt_token_ids, delta.prompt_logprobs)
                choice = {"index": index, "text": echoes[index], "logprobs": prompt, "finish_reason": None}
                yield _sse({**base, "choices": [choice], **extra})
            logprobs = None
            if body.logprobs is not None and delta.logprobs:
                logprobs = completion_logprobs(delta.logprobs, offsets[index])
                offsets[index] += sum(len(t.token) for t in delta.logprobs)
            if not (delta.text or delta.finished or logprobs):
                continue
            if delta.finished:
                completion_tokens += delta.num_generated_tokens
                cached_tokens[index] = delta.num_cached_tokens
            choice = {"index": index, "text": delta.text, "logprobs": logprobs,
                      "finish_reason": delta.finish_reason if delta.finished else None}
            yield _sse({**base, "choices": [choice], **extra})
        if include_usage:
            prompt_tokens = sum(len(job.prompt_token_ids) for job in jobs[:: body.n])
            yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens,
                                                               sum(cached_tokens[:: body.n]))})
        yield "data: [DONE]\n\n"
    except Exception as error:  # headers are sent: the error travels as an event
        yield _stream_error(error, ctx)


# ---- /v1/chat/completions -------------------------------------------------------------------


async def chat_completions(ctx: ServingContext, body: ChatCompletionRequest, request: Request):
    arrival = time.perf_counter()
    engine = ctx.ready_engine()
    _check_common(ctx, body, 1)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs", "needs logprobs: true")
    max_tokens, max_tokens_name = body.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:
        max_tokens, max_tokens_name = body.max_tokens, "max_tokens"
    elif body.max_tokens is not None and body.max_tokens != max_tokens:
        raise bad_request("max_tokens", "give max_tokens or max_completion_tokens, not two different values")
    guided, guided_field = _guided(body)
    tools = _tool_calling(body)
    if tools is not None:  # the calls' JSON schema constrains the reply
        if guided is not None:
            raise bad_request(guided_field, "the reply is tool calls (tool_choice), whose schema constrains it "
                                            "already; leave this out or set tool_choice 'none'")
        guided, guided_field = tools.guided(), "tools"
    params = _params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None, guided)
    try:
        messages = template_messages(body.messages)
        if tools is not None:
            messages = add_system_note(messages, tools.system_note())
        prompt, chat_params = engine.chat_request(messages, params)
    except ChatFormatError as error:
        raise bad_request(error.field, error.message) from None
    names = FieldNames("messages", {**_ENGINE_NAMES, "max_new_tokens": max_tokens_name, "logprobs": "top_logprobs",
                                    "guided": guided_field})
    job = await ctx.prepare(prompt, chat_params, names, max_new_tokens_given=max_tokens is not None)
    jobs = _fan_out(job, body.n)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        lease = ctx.admission.acquire(len(jobs))
        return EventStreamResponse(_chat_events(ctx, body, jobs, response_id, created, arrival, tools),
                                   on_close=lease.release)
    try:
        results: list[Generated] = await ctx.run_to_completion(request.receive, jobs, arrival)
    except RequestTimeout:
        raise timeout_error(ctx) from None
    choices = []
    for index, result in enumerate(results):
        message, finish_reason = {"role": "assistant", "content": result.text.lstrip()}, result.finish_reason
        calls = tools.parse(result.text) if tools is not None and finish_reason == "stop" else None
        if calls:
            message = {"role": "assistant", "content": None, "tool_calls": [tool_call(*call) for call in calls]}
            finish_reason = "tool_calls"
        choices.append({"index": index, "message": message,
                        "logprobs": chat_logprobs(result.logprobs) if body.logprobs else None,
                        "finish_reason": finish_reason})
    return {"id": response_id, "object": "chat.completion", "created": created, "model": ctx.model_name,
            "choices": choices, "usage": _usage(len(job.prompt_token_ids), sum(len(r.token_ids) for r in results),
                                                results[0].num_cached_tokens)}


async def _chat_events(ctx: ServingContext, body: ChatCompletionRequest, jobs: list[Prepared], response_id: str,
                       created: int, arrival: float, tools: ToolCalling | None) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    base = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": ctx.model_name}
    extra = {"usage": None} if include_usage else {}
    replies = [_StreamedReply(tools) for _ in jobs]
    completion_tokens = cached_tokens = 0
    try:
        for index in range(len(jobs)):
            choice = {"index": index, "delta": {"role": "assistant", "content": None if tools else ""},
                      "logprobs": None, "finish_reason": None}
            yield _sse({**base, "choices": [choice], **extra})
        deadline = ctx.deadline(arrival)
        async for index, delta in merge_streams([ctx.stream(job, arrival, deadline) for job in jobs]):
            message, finish_reason = replies[index].add(delta.text, delta.finish_reason if delta.finished else None)
            logprobs = chat_logprobs(delta.logprobs) if body.logprobs and delta.logprobs else None
            if delta.finished:
                completion_tokens += delta.num_generated_tokens
                if index == 0:
                    cached_tokens = delta.num_cached_tokens
            if not (message or delta.finished or logprobs):
                continue
            choice = {"index": index, "delta": message, "logprobs": logprobs, "finish_reason": finish_reason}
            yield _sse({**base, "choices": [choice], **extra})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(len(jobs[0].prompt_token_ids), completion_tokens,
                                                               cached_tokens)})
        yield "data: [DONE]\n\n"
    except Exception as error:
        yield _stream_error(error, ctx)


class _StreamedReply:
    """One streamed chat reply: text deltas become `content` deltas (left-stripped, as the whole
    reply is), or tool calls. A call to a named function streams its arguments as they come
    (the first delta carries the call's id and name); a "required" reply's array of calls is
    held back and sent whole, one complete call each, when it ends. A reply cut short (length)
    sends what it held as text."""

    def __init__(self, tools: ToolCalling | None):
        self.tools = tools
        self.text = ""  # the whole reply so far
        self.started = False  # content: whitespace before the first text dropped; a named call: its header sent

    def add(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The delta message for `text`, and the finish reason to send with it."""
        self.text += text
        if self.tools is None:
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            return ({"content": text} if text else {}), finish_reason
        calls = self.tools.parse(self.text) if finish_reason == "stop" else None
        if self.tools.forced is not None:
            message = {}
            if text:
                call = {"index": 0, "function": {"arguments": text}}
                if not self.started:  # the first delta names the call
                    call = {"index": 0, "id": new_call_id(), "type": "function",
                            "function": {"name": self.tools.forced, "arguments": text}}
                    self.started = True
                message = {"tool_calls": [call]}
            return message, ("tool_calls" if calls else finish_reason)
        if finish_reason is None:
            return {}, None
        if calls:
            return {"tool_calls": [{"index": i, **tool_call(*call)} for i, call in enumerate(calls)]}, "tool_calls"
        return ({"content": self.text} if self.text else {}), finish_reason
