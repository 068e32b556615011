"""Text Generation Inference: `/generate`, `/generate_stream`, `/info` and the compatibility route `POST /`."""

from __future__ import annotations

import json
import logging
import time
from typing import AsyncIterator

from fastapi import Request

import starchat
from starchat.outputs import StreamDelta, TokenLogprob
from starchat.sampling_params import GuidedDecoding, SamplingParams
from starchat.server.errors import ApiError, bad_request, error_body
from starchat.server.protocol_tgi import GenerateRequest, TGIParameters
from starchat.server.serving import FieldNames, Generated, Prepared, RequestTimeout, ServingContext
from starchat.server.streaming import EventStreamResponse

logger = logging.getLogger("starchat.server")

DEFAULT_MAX_NEW_TOKENS = 100  # TGI's default
MAX_STOP_SEQUENCES = 16
MAX_BEST_OF = 4
NAMES = FieldNames("inputs", {name: f"parameters.{name}" for name in TGIParameters.model_fields}
                   | {"logprobs": "parameters.top_n_tokens", "guided": "parameters.grammar"}, status=422)


def info(ctx: ServingContext) -> dict:
    engine = ctx.engine
    inner = getattr(engine, "engine", None)
    loaded = engine is not None
    return {
        "model_id": ctx.model_name,
        "model_sha": None,
        "model_dtype": str(getattr(inner, "dtype", ctx.settings.dtype)).removeprefix("torch."),
        "model_device_type": str(getattr(getattr(inner, "device", None), "type", ctx.settings.device)),
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": ctx.admission.capacity,
        "max_best_of": MAX_BEST_OF,
        "max_stop_sequences": MAX_STOP_SEQUENCES,
        "max_input_tokens": ctx.max_input_tokens if loaded else None,
        "max_input_length": ctx.max_input_tokens if loaded else None,
        "max_total_tokens": ctx.max_total_tokens if loaded else None,
        "validation_workers": 1,
        "max_client_batch_size": 1,
        "router": "starchat",
        "version": starchat.__version__,
        "sha": None,
        "docker_label": None,
    }


def sampling_params(parameters: TGIParameters) -> SamplingParams:
    def refuse(name: str, message: str) -> ApiError:
        return bad_request(f"parameters.{name}", message, status=422)

    if (parameters.best_of or 1) > MAX_BEST_OF:
        raise refuse("best_of", f"at most {MAX_BEST_OF}, got {parameters.best_of}")
    if parameters.watermark:
        raise refuse("watermark", "watermarking is not supported")
    if parameters.frequency_penalty:
        raise refuse("frequency_penalty", "only 0 is supported (use repetition_penalty)")
    guided = _guided(parameters.grammar, refuse)
    if parameters.adapter_id is not None:
        raise refuse("adapter_id", "adapters are not supported")
    stop = list(parameters.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES:
        raise refuse("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stop)}")
    temperature, top_p, typical_p = parameters.temperature, parameters.top_p, parameters.typical_p
    # As TGI: any sampling warper (temperature, top_k, top_p, typical_p) switches sampling on.
    do_sample = bool(parameters.do_sample) or (temperature not in (None, 1.0)) or bool(parameters.top_k) \
        or (top_p not in (None, 1.0)) or (typical_p not in (None, 1.0))
    if (parameters.best_of or 1) > 1:  # as TGI: candidates are sampled, each from its own seed
        if not do_sample:
            raise refuse("best_of", "best_of > 1 needs sampling (do_sample or a sampling parameter)")
        if parameters.seed is not None:
            raise refuse("seed", "must not be set when best_of > 1")
    return SamplingParams(
        max_new_tokens=parameters.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=1.0 if temperature is None else temperature, top_k=parameters.top_k or 0,
        top_p=1.0 if top_p is None else top_p, typical_p=1.0 if typical_p is None else typical_p,
        repetition_penalty=1.0 if parameters.repetition_penalty is None else parameters.repetition_penalty,
        do_sample=do_sample, seed=parameters.seed, stop=stop,
        logprobs=parameters.top_n_tokens or 0,  # TGI reports every token's logprob
        prompt_logprobs=0 if parameters.decoder_input_details else None, guided=guided,
    )


def _guided(grammar: dict | None, refuse) -> GuidedDecoding | None:
    """TGI's grammar: {"type": "json", "value": schema (an object or its JSON text)} or
    {"type": "regex", "value": pattern}."""
    if grammar is None:
        return None
    kind, value = grammar.get("type"), grammar.get("value")
    unknown = sorted(set(grammar) - {"type", "value"})
    if unknown:
        raise refuse("grammar", f"unknown key {unknown[0]!r}; a grammar has 'type' and 'value'")
    if kind == "json" and isinstance(value, (dict, str)):
        return GuidedDecoding("json_schema", value if isinstance(value, str) else json.dumps(value))
    if kind == "regex" and isinstance(value, str):
        return GuidedDecoding("regex", value)
    raise refuse("grammar", 'expected {"type": "json", "value": <JSON schema>} or {"type": "regex", "value": <string>}')


def _finish_reason(reason: str | None, stop_reason) -> str:
    if reason == "length":
        return "length"
    return "stop_sequence" if isinstance(stop_reason, str) else "eos_token"


def _token(ctx: ServingContext, token_id: int, text: str, logprob: float | None) -> dict:
    tokenizer = ctx.ready_engine().tokenizer
    # In a stream, a special token (end of text) shows no text; should text held back by a
    # stop-sequence check come out with it, the event is not marked special, so that clients
    # which drop special tokens keep that text.
    special = token_id in tokenizer.special_token_ids and text in ("", tokenizer.token_text(token_id))
    return {"id": token_id, "text": text, "logprob": logprob, "special": special}


def _top_tokens(ctx: ServingContext, logprob: TokenLogprob) -> list[dict]:
    return [_token(ctx, token_id, text, lp) for token_id, text, lp in logprob.top]


async def _prepare(ctx: ServingContext, body: GenerateRequest) -> tuple[Prepared, TGIParameters]:
    parameters = body.parameters
    job = await ctx.prepare(body.inputs, sampling_params(parameters), NAMES,
                            default_max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
                            max_new_tokens_given=parameters.max_new_tokens is not None, truncate=parameters.truncate)
    return job, parameters


def timeout_error(ctx: ServingContext) -> ApiError:
    return ApiError(408, f"the generation took longer than the request timeout of {ctx.settings.request_timeout:g} s "
                         "and was cancelled", kind="timeout")


async def generate(ctx: ServingContext, body: GenerateRequest, request: Request) -> dict:
    arrival = time.perf_counter()
    job, parameters = await _prepare(ctx, body)
    try:
        results = await ctx.run_to_completion(request.receive, [job] * (parameters.best_of or 1), arrival)
    except RequestTimeout:
        raise timeout_error(ctx) from None
    # best_of: TGI answers with the candidate of the highest summed log-probability and lists the
    # others in details.best_of_sequences.
    ranked = sorted(results, key=lambda result: -sum(lp.logprob for lp in result.logprobs))
    answer = _answer(ctx, body, parameters, ranked[0], job.prompt_token_ids)
    if len(results) > 1 and parameters.details:
        answer["details"]["best_of_sequences"] = [
            {"generated_text": other["generated_text"], **other["details"]}
            for other in (_answer(ctx, body, parameters, result, job.prompt_token_ids) for result in ranked[1:])]
    return answer


def _answer(ctx: ServingContext, body: GenerateRequest, parameters: TGIParameters, result: Generated,
            prompt_token_ids: list[int]) -> dict:
    text = body.inputs + result.text if parameters.return_full_text else result.text
    answer: dict = {"generated_text": text}
    if parameters.details:
        token_text = ctx.ready_engine().tokenizer.token_text
        logprobs = result.logprobs or [None] * len(result.token_ids)
        details = {
            "finish_reason": _finish_reason(result.finish_reason, result.stop_reason),
            "generated_tokens": len(result.token_ids),
            "seed": result.seed,
            "prefill": _prefill(ctx, prompt_token_ids, result.prompt_logprobs) if parameters.decoder_input_details else [],
            "tokens": [_token(ctx, token_id, token_text(token_id), lp.logprob if lp else None)
                       for token_id, lp in zip(result.token_ids, logprobs)],
        }
        if parameters.top_n_tokens:
            details["top_tokens"] = [_top_tokens(ctx, lp) for lp in result.logprobs]
        answer["details"] = details
    return answer


def _prefill(ctx: ServingContext, prompt_token_ids: list[int], scored: list[TokenLogprob | None]) -> list[dict]:
    """TGI's decoder input details: each prompt token with its log-probability (none for the first)."""
    token_text = ctx.ready_engine().tokenizer.token_text
    return [{"id": token_id, "text": token_text(token_id), "logprob": entry.logprob if entry else None}
            for token_id, entry in zip(prompt_token_ids, scored)]


def generate_stream(ctx: ServingContext, job: Prepared, body: GenerateRequest, parameters: TGIParameters,
                    arrival: float) -> EventStreamResponse:
    lease = ctx.admission.acquire(1)
    return EventStreamResponse(_events(ctx, job, body, parameters, arrival), on_close=lease.release)


async def compat(ctx: ServingContext, body, request: Request):
    """`POST /`: `[{"generated_text", "details"}]`, or the stream when `stream` is true."""
    if body.stream:
        return await stream(ctx, body, request)
    return [await generate(ctx, body, request)]


async def stream(ctx: ServingContext, body: GenerateRequest, request: Request) -> EventStreamResponse:
    arrival = time.perf_counter()
    if body.parameters.decoder_input_details:  # as TGI
        raise bad_request("parameters.decoder_input_details", "is not supported when streaming tokens", status=422)
    if (body.parameters.best_of or 1) > 1:
        raise bad_request("parameters.best_of", "best_of > 1 is not supported when streaming tokens", status=422)
    job, parameters = await _prepare(ctx, body)
    return generate_stream(ctx, job, body, parameters, arrival)


def _sse(data: dict) -> str:
    return f"data:{json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(ctx: ServingContext, job: Prepared, body: GenerateRequest, parameters: TGIParameters,
                  arrival: float) -> AsyncIterator[str]:
    text = body.inputs if parameters.return_full_text else ""
    index = 0
    try:
        delta: StreamDelta
        async for delta in ctx.stream(job, arrival, ctx.deadline(arrival)):
            text += delta.text
            if not delta.token_ids:  # a cancelled request's last delta carries no token
                continue
            index += 1
            logprob = delta.logprobs[0] if delta.logprobs else None
            event = {
                "index": index,
                # The shown text of this step (never half a character, never part of a stop
                # sequence), so that the streamed texts add up to generated_text.
                "token": _token(ctx, delta.token_ids[0], delta.text, logprob.logprob if logprob else None),
                "top_tokens": _top_tokens(ctx, logprob) if parameters.top_n_tokens and logprob else None,
                "generated_text": None,
                "details": None,
            }
            if delta.finished:
                event["generated_text"] = text
                if parameters.details:
                    event["details"] = {"finish_reason": _finish_reason(delta.finish_reason, delta.stop_reason),
                                        "generated_tokens": delta.num_generated_tokens, "seed": delta.seed}
            yield _sse(event)
    except Exception as error:  # headers are sent: the error travels as an event
        if isinstance(error, RequestTimeout):
            error = timeout_error(ctx)
        elif not isinstance(error, ApiError):
            logger.exception("generation failed mid-stream", exc_info=error)
            error = ApiError(500, f"generation failed: {error}", kind="internal")
        yield _sse(error_body("tgi", error))
