"""One input row -> an engine request, and a finished request -> the row's result record.

A row's request (see readers.InputRow) is Azure-style text or chat with `/score` parameters, or
an OpenAI batch line whose body follows `/v1/completions` or `/v1/chat/completions`. Anything
wrong with a row raises a ValueError (RowRequestError, SamplingParamsError, RequestError,
ChatFormatError) whose message names the field: the row fails, the job goes on.
Result records are plain dicts, the unit the journal stores and the writers format.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from starchat.azureml_params import merge_azureml_parameters, sampling_params_from_azureml
from starchat.chat_template import fim_prompt
from starchat.errors import FieldError
from starchat.sampling_params import SamplingParams, SamplingParamsError
from starchat.structured_output import GUIDED_FIELDS, guided_from_openai

COMPLETIONS_URL, CHAT_URL = "/v1/completions", "/v1/chat/completions"


class RowRequestError(FieldError):
    """A row that cannot become a request; `field` names the bad part of the row."""


@dataclass
class PreparedRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    prefix: str  # put before the generated text in the prediction: the prompt for return_full_text / echo
    strip_reply: bool  # chat replies are left-stripped (the model writes a newline after <|assistant|>)
    url: str  # the OpenAI endpoint whose response shape this row gets
    model: str


def prepare_request(engine, request: dict, job_parameters: dict | None = None) -> PreparedRequest:
    """Tokenized prompt and checked SamplingParams for one row; raises ValueError naming the bad field."""
    kind = request["type"]
    if kind == "text":
        params, full_text = sampling_params_from_azureml(merge_azureml_parameters(job_parameters, request.get("parameters")))
        ids = _checked_ids(engine, request["prompt"], params)
        return PreparedRequest(ids, params, request["prompt"] if full_text else "", False, COMPLETIONS_URL, engine.model_name)
    if kind == "chat":
        params, _ = sampling_params_from_azureml(merge_azureml_parameters(job_parameters, request.get("parameters")))
        prompt, params = engine.chat_request(request["messages"], params)
        ids = _checked_ids(engine, prompt, params)
        return PreparedRequest(ids, params, "", True, CHAT_URL, engine.model_name)
    if kind == "openai":
        return _prepare_openai(engine, request["url"], request["body"])
    raise RowRequestError("type", f"unknown request type {kind!r}")


def _checked_ids(engine, prompt, params: SamplingParams) -> list[int]:
    ids = engine.tokenize_prompt(prompt)
    engine.check_request(ids, params)
    return ids


# ---- OpenAI bodies ------------------------------------------------------------------------------

_COMMON_KEYS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                "presence_penalty", "frequency_penalty", "logit_bias", "user", "logprobs",
                "top_k", "min_p", "min_tokens", "repetition_penalty",  # vLLM's extra sampling fields
                *GUIDED_FIELDS}
_COMPLETION_KEYS = _COMMON_KEYS | {"prompt", "suffix", "echo", "best_of"}
_CHAT_KEYS = _COMMON_KEYS | {"messages", "max_completion_tokens", "top_logprobs", "tools",
                             "tool_choice", "parallel_tool_calls"}
_RENAMED = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


def _prepare_openai(engine, url: str, body: dict) -> PreparedRequest:
    allowed = _COMPLETION_KEYS if url == COMPLETIONS_URL else _CHAT_KEYS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RowRequestError(f"body.{unknown[0]}", f"unknown field for {url}")
    _refuse_unsupported(body, url)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    temperature = body.get("temperature", 1.0)
    values = dict(temperature=temperature if temperature is not None else 1.0,
                  top_p=body.get("top_p") if body.get("top_p") is not None else 1.0,
                  top_k=body.get("top_k") or 0,
                  min_p=body.get("min_p") or 0.0,
                  min_new_tokens=body.get("min_tokens") or 0,
                  repetition_penalty=body.get("repetition_penalty") or 1.0,
                  presence_penalty=body.get("presence_penalty") or 0.0,
                  frequency_penalty=body.get("frequency_penalty") or 0.0,
                  logit_bias=_logit_bias(body.get("logit_bias")),
                  seed=body.get("seed"))
    values["do_sample"] = isinstance(values["temperature"], (int, float)) and values["temperature"] > 0
    try:
        values["guided"] = guided_from_openai(body)[0]
    except SamplingParamsError as error:
        raise RowRequestError(f"body.{error.field}", error.message) from None
    stop = body.get("stop")
    params = SamplingParams(**values, stop=[stop] if isinstance(stop, str) else list(stop or []))
    model = body.get("model") or engine.model_name
    if url == COMPLETIONS_URL:
        prompt = _completion_prompt(body.get("prompt"))
        if body.get("suffix"):
            if not isinstance(prompt, str) or not isinstance(body["suffix"], str):
                raise RowRequestError("body.suffix", "needs a text prompt and a text suffix")
            prompt = fim_prompt(prompt, body["suffix"])
        params.max_new_tokens = 16 if max_tokens is None else max_tokens  # OpenAI's default for completions
        ids = engine.tokenize_prompt(prompt)
        _check_openai(engine, ids, params, body)
        prefix = ""
        if body.get("echo"):
            prefix = prompt if isinstance(prompt, str) else engine.tokenizer.decode(ids)
        return PreparedRequest(ids, params, prefix, False, url, model)
    prompt, params = engine.chat_request(body.get("messages"), params)
    ids = engine.tokenize_prompt(prompt)
    # Chat's default is "as long as the context allows" (what vLLM does).
    params.max_new_tokens = max(1, engine.max_model_len - len(ids)) if max_tokens is None else max_tokens
    _check_openai(engine, ids, params, body)
    return PreparedRequest(ids, params, "", True, url, model)


def _refuse_unsupported(body: dict, url: str) -> None:
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise RowRequestError(f"body.{name}", "only 1 completion per line is supported; repeat the line instead")
    if body.get("stream"):
        raise RowRequestError("body.stream", "batch lines cannot stream; leave stream out or false")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise RowRequestError("body.logprobs", "log-probabilities are not supported in batch output yet")
    if body.get("tools"):
        raise RowRequestError("body.tools", "tool calls are not supported by StarChat")


def _logit_bias(bias) -> dict[int, float]:
    """OpenAI's {"token id": bias} (JSON keys are strings)."""
    if bias is None:
        return {}
    if not isinstance(bias, dict) or not all(isinstance(key, str) and key.strip().isdigit() for key in bias):
        raise RowRequestError("body.logit_bias", "must map token ids (integers as strings) to biases")
    return {int(key): value for key, value in bias.items()}


def _completion_prompt(prompt):
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
        return prompt
    raise RowRequestError("body.prompt", "must be one string or one list of token ids (one prompt per line)")


def _check_openai(engine, ids: list[int], params: SamplingParams, body: dict) -> None:
    try:
        engine.check_request(ids, params)
    except SamplingParamsError as error:
        field = guided_from_openai(body)[1] if error.field == "guided" else _RENAMED.get(error.field, error.field)
        raise RowRequestError(f"body.{field}", error.message) from None


# ---- result records -----------------------------------------------------------------------------

def success_record(task: dict, prepared: PreparedRequest, text: str, finish_reason: str | None,
                   completion_tokens: int, attempts: int, cached_tokens: int = 0) -> dict:
    """`cached_tokens`: prompt tokens taken from the engine's prefix cache."""
    reply = text.lstrip() if prepared.strip_reply else text
    return {**_record_head(task), "ok": True, "prediction": prepared.prefix + reply, "finish_reason": finish_reason,
            "prompt_tokens": len(prepared.prompt_token_ids), "completion_tokens": completion_tokens,
            "cached_tokens": cached_tokens, "attempts": attempts, "url": prepared.url, "model": prepared.model, "created": int(time.time())}


def failure_record(task: dict, message: str, attempts: int, status_code: int = 400) -> dict:
    request = task.get("request") or {}
    url = request.get("url") or (CHAT_URL if request.get("type") == "chat" else COMPLETIONS_URL)
    return {**_record_head(task), "ok": False, "error": message, "attempts": attempts,
            "status_code": status_code, "url": url}


def _record_head(task: dict) -> dict:
    return {"k": list(task["k"]), "file": task["file"], "row": task["row"], "custom_id": task.get("custom_id")}
