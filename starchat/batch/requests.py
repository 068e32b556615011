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
from starchat.openai_format import best_of_order
from starchat.outputs import TokenLogprob
from starchat.sampling_params import SamplingParams, SamplingParamsError
from starchat.server.protocol_openai import ChatCompletionRequest, CompletionRequest
from starchat.structured_output import guided_from_openai
from starchat.tool_calls import ToolCalling, add_system_note, render_tool_turns, tool_calling_from_openai

COMPLETIONS_URL, CHAT_URL = "/v1/completions", "/v1/chat/completions"
MAX_SAMPLES_PER_LINE = 128  # OpenAI's limit on n


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
    tools: ToolCalling | None = None  # an OpenAI chat line whose reply must be tool calls
    n: int = 1  # samples of the prompt (OpenAI lines' n, or best_of candidates), run as n requests
    keep: int | None = None  # with best_of > n: how many of the samples to return, the best first
    report_logprobs: bool = True  # False: logprobs computed only to rank best_of candidates


@dataclass
class Sample:
    """One finished sample of a row."""

    text: str
    finish_reason: str | None
    completion_tokens: int
    logprobs: list[TokenLogprob]  # empty unless the row asked for them
    # An echoed prompt scored (echo with logprobs): each prompt token's text, and its
    # log-probability given the tokens before it (None for the first)
    prompt_texts: list[str] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


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

# A line's body may have the fields the server's routes take (their request models), so the same
# body works in both places; the values are checked here, row by row.
_COMPLETION_KEYS = frozenset(CompletionRequest.model_fields)
_CHAT_KEYS = frozenset(ChatCompletionRequest.model_fields)
_RENAMED = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


def _prepare_openai(engine, url: str, body: dict) -> PreparedRequest:
    allowed = _COMPLETION_KEYS if url == COMPLETIONS_URL else _CHAT_KEYS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RowRequestError(f"body.{unknown[0]}", f"unknown field for {url}")
    _refuse_unsupported(body, url)
    n, best_of = _samples(body)
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
                  seed=body.get("seed"),
                  stop_token_ids=body.get("stop_token_ids") or [],  # (extensions, as on the server)
                  ignore_eos=body.get("ignore_eos", False))
    if not isinstance(values["ignore_eos"], bool):
        raise RowRequestError("body.ignore_eos", "must be true or false")
    values["do_sample"] = isinstance(values["temperature"], (int, float)) and values["temperature"] > 0
    try:
        values["guided"], guided_field = guided_from_openai(body)
        tools = tool_calling_from_openai(body) if url == CHAT_URL else None
    except SamplingParamsError as error:
        raise RowRequestError(f"body.{error.field}", error.message) from None
    if tools is not None:  # the calls' JSON schema constrains the reply
        if values["guided"] is not None:
            raise RowRequestError(f"body.{guided_field}", "the reply is tool calls (tool_choice), whose schema "
                                                          "constrains it already; leave this out or set tool_choice 'none'")
        values["guided"] = tools.guided()
    values["logprobs"] = _logprobs(body, url)
    reported = values["logprobs"] is not None
    if best_of > n and not reported:
        values["logprobs"] = 0  # the candidates are ranked on their tokens' log-probabilities
    stop = body.get("stop")
    params = SamplingParams(**values, stop=[stop] if isinstance(stop, str) else list(stop or []))
    model = body.get("model") or engine.model_name
    if url == COMPLETIONS_URL:
        given = prompt = _completion_prompt(body.get("prompt"))
        if body.get("suffix"):
            if not isinstance(prompt, str) or not isinstance(body["suffix"], str):
                raise RowRequestError("body.suffix", "needs a text prompt and a text suffix")
            prompt = fim_prompt(prompt, body["suffix"])
        params.max_new_tokens = 16 if max_tokens is None else max_tokens  # OpenAI's default for completions
        if body.get("echo") and reported:
            params.prompt_logprobs = params.logprobs  # the echoed prompt is scored (evaluation harnesses)
        ids = engine.tokenize_prompt(prompt)
        _check_openai(engine, ids, params, body)
        prefix = ""
        if body.get("echo"):  # the prompt as given (a fill-in-the-middle prompt's own text, not its markers)
            prefix = given if isinstance(given, str) else engine.tokenizer.decode(ids)
        return PreparedRequest(ids, params, prefix, False, url, model, n=best_of, keep=n if best_of > n else None,
                               report_logprobs=reported)
    messages = body.get("messages")
    if isinstance(messages, list) and all(isinstance(message, dict) for message in messages):
        messages = render_tool_turns(messages)  # (anything else: chat_request says what is wrong)
        if tools is not None:
            messages = add_system_note(messages, tools.system_note())
    prompt, params = engine.chat_request(messages, params)
    ids = engine.tokenize_prompt(prompt)
    # Chat's default is "as long as the context allows" (what vLLM does).
    params.max_new_tokens = max(1, engine.max_model_len - len(ids)) if max_tokens is None else max_tokens
    _check_openai(engine, ids, params, body, tools)
    return PreparedRequest(ids, params, "", True, url, model, tools, n)  # (best_of is a completions field)


def _samples(body: dict) -> tuple[int, int]:
    """(n, best_of): the samples returned and the candidates generated for them."""
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES_PER_LINE:
        raise RowRequestError("body.n", f"must be an integer in 1..{MAX_SAMPLES_PER_LINE}")
    best_of = body.get("best_of")
    if best_of is None:
        return n, n
    if isinstance(best_of, bool) or not isinstance(best_of, int) or not n <= best_of <= MAX_SAMPLES_PER_LINE:
        raise RowRequestError("body.best_of", f"must be an integer from n ({n}) to {MAX_SAMPLES_PER_LINE}")
    return n, best_of


def _refuse_unsupported(body: dict, url: str) -> None:
    if body.get("stream"):
        raise RowRequestError("body.stream", "batch lines cannot stream; leave stream out or false")
    if url == COMPLETIONS_URL and body.get("echo") and body.get("logprobs") is not None and body.get("suffix"):
        raise RowRequestError("body.echo", "echo with logprobs scores the prompt as given; it cannot be combined "
                                           "with suffix")


def _logprobs(body: dict, url: str) -> int | None:
    """SamplingParams.logprobs: completions' `logprobs` (top-n), chat's `logprobs` (a switch) with
    `top_logprobs` (top-n); None when not asked for."""
    if url == COMPLETIONS_URL:
        return body.get("logprobs")  # checked by SamplingParams (named logprobs)
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted not in (None, True, False):
        raise RowRequestError("body.logprobs", "must be true or false for chat")
    if top is not None:
        if not wanted:
            raise RowRequestError("body.top_logprobs", "needs logprobs: true")
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= SamplingParams.MAX_LOGPROBS:
            raise RowRequestError("body.top_logprobs", f"must be an integer in 0..{SamplingParams.MAX_LOGPROBS}")
    return (top or 0) if wanted else None


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


def _check_openai(engine, ids: list[int], params: SamplingParams, body: dict, tools: ToolCalling | None = None) -> None:
    try:
        engine.check_request(ids, params)
    except SamplingParamsError as error:
        field = _RENAMED.get(error.field, error.field)
        if error.field == "guided":
            field = "tools" if tools is not None else guided_from_openai(body)[1]
        raise RowRequestError(f"body.{field}", error.message) from None


# ---- result records -----------------------------------------------------------------------------

def success_record(task: dict, prepared: PreparedRequest, samples: list[Sample], attempts: int,
                   cached_tokens: int = 0) -> dict:
    """`samples`: the row's samples (its n, or its best_of candidates), in order; `cached_tokens`:
    prompt tokens the first took from the engine's prefix cache. The record's top-level prediction, finish reason, tool calls
    and logprobs are the first sample's; a row of several samples lists every one in `choices`.
    Logprobs (rows that asked) are journaled as [id, text, logprob, [[id, text, logprob]]], tool
    calls as [name, arguments]."""
    kept = samples
    if prepared.keep is not None:  # best_of: the best `keep` candidates; usage counts them all
        kept = [samples[i] for i in best_of_order([sample.logprobs for sample in samples])[:prepared.keep]]
    choices = [_choice(prepared, sample) for sample in kept]
    record = {**_record_head(task), "ok": True, **choices[0],
              "prompt_tokens": len(prepared.prompt_token_ids),
              "completion_tokens": sum(sample.completion_tokens for sample in samples),
              "cached_tokens": cached_tokens, "attempts": attempts, "url": prepared.url, "model": prepared.model,
              "created": int(time.time())}
    if len(choices) > 1:
        record["choices"] = choices
    return record


def _choice(prepared: PreparedRequest, sample: Sample) -> dict:
    reply = sample.text.lstrip() if prepared.strip_reply else sample.text
    choice = {"prediction": prepared.prefix + reply, "finish_reason": sample.finish_reason}
    calls = prepared.tools.parse(reply) if prepared.tools is not None and sample.finish_reason == "stop" else None
    if calls:  # the writer gives them ids derived from the row
        choice["tool_calls"], choice["finish_reason"] = [list(call) for call in calls], "tool_calls"
    if prepared.params.logprobs is not None and prepared.report_logprobs:
        choice["logprobs"] = [_journaled(t) for t in sample.logprobs]
    if sample.prompt_logprobs is not None:  # [text, [id, text, logprob, top] or None] per prompt token
        choice["prompt_logprobs"] = [[text, _journaled(t) if t is not None else None]
                                     for text, t in zip(sample.prompt_texts, sample.prompt_logprobs)]
        choice["echo_chars"] = len(prepared.prefix)  # where the generated text's offsets start
    return choice


def _journaled(token: TokenLogprob) -> list:
    entry = [token.token_id, token.token, token.logprob, [list(alt) for alt in token.top]]
    if token.partial_bytes:  # [[id, [bytes]], ...]: only pieces of characters (older journals: none)
        entry.append([[token_id, list(raw)] for token_id, raw in token.partial_bytes.items()])
    return entry


def _restored(entry: list) -> TokenLogprob:
    token_id, text, logprob, top, *partial = entry
    restored = TokenLogprob(token_id, text, logprob, [tuple(alt) for alt in top])
    restored.partial_bytes = {shown_id: bytes(raw) for shown_id, raw in (partial[0] if partial else [])}
    return restored


def record_choices(record: dict) -> list[dict]:
    """A success record's samples: its `choices`, or the record itself for a row of one."""
    return record.get("choices") or [record]


def record_logprobs(choice: dict) -> list[TokenLogprob] | None:
    """The TokenLogprobs a success record's choice (record_choices) journaled, or None."""
    entries = choice.get("logprobs")
    return None if entries is None else [_restored(entry) for entry in entries]


def record_prompt_logprobs(choice: dict) -> tuple[list[str], list[TokenLogprob | None]] | None:
    """An echoed, scored prompt's token texts and log-probabilities as a choice journaled them, or None."""
    entries = choice.get("prompt_logprobs")
    if entries is None:
        return None
    return [text for text, _ in entries], [_restored(entry) if entry is not None else None for _, entry in entries]


def failure_record(task: dict, message: str, attempts: int, status_code: int = 400) -> dict:
    request = task.get("request") or {}
    url = request.get("url") or (CHAT_URL if request.get("type") == "chat" else COMPLETIONS_URL)
    return {**_record_head(task), "ok": False, "error": message, "attempts": attempts,
            "status_code": status_code, "url": url}


def _record_head(task: dict) -> dict:
    return {"k": list(task["k"]), "file": task["file"], "row": task["row"], "custom_id": task.get("custom_id")}
