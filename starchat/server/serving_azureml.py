"""`POST /score`: Azure ML real-time scoring, text generation and chat."""

from __future__ import annotations

import time

from fastapi import Request

from starchat.azureml_params import AzureMLParametersError, sampling_params_from_azureml
from starchat.chat_template import ChatFormatError
from starchat.sampling_params import SamplingParams
from starchat.server.errors import ApiError, bad_request
from starchat.server.protocol_azureml import AzureMLParameters, AzureMLScoreRequest
from starchat.server.serving import FieldNames, RequestTimeout, ServingContext

DEFAULT_MAX_NEW_TOKENS = 256
_PARAMETERS = "input_data.parameters"


def _names(prompt_field: str, max_new_tokens_field: str) -> FieldNames:
    mapping = {name: f"{_PARAMETERS}.{name}" for name in AzureMLParameters.model_fields}
    mapping["max_new_tokens"] = f"{_PARAMETERS}.{max_new_tokens_field}"
    return FieldNames(prompt=prompt_field, mapping=mapping, status=400)


def sampling_params(parameters: AzureMLParameters) -> tuple[SamplingParams, bool, bool, str]:
    """(params, return_full_text, max_new_tokens given?, the name the caller used for it).

    The mapping is the batch runner's too (starchat/azureml_params.py): both endpoints read a
    `parameters` object the same way.
    """
    given = parameters.model_dump(exclude_unset=True, exclude_none=True)
    try:
        params, return_full_text = sampling_params_from_azureml(given, SamplingParams(max_new_tokens=DEFAULT_MAX_NEW_TOKENS))
    except AzureMLParametersError as error:
        raise bad_request(f"{_PARAMETERS}.{error.field}", error.message) from None
    used = next((name for name in ("max_new_tokens", "max_gen_len") if name in given), "max_new_tokens")
    return params, return_full_text, used in given, used


async def score(ctx: ServingContext, body: AzureMLScoreRequest, request: Request):
    arrival = time.perf_counter()
    engine = ctx.ready_engine()
    data = body.input_data
    params, full_text, given, used = sampling_params(data.parameters)
    prompt_field = "input_data.input_string"
    try:
        if data.is_chat:
            try:
                prompt, chat_params = engine.chat_request(data.input_string, params)
            except ChatFormatError as error:
                field = error.field.replace("messages", prompt_field, 1)
                raise bad_request(field, error.message) from None
            job = await ctx.prepare(prompt, chat_params, _names(prompt_field, used),
                                    default_max_new_tokens=DEFAULT_MAX_NEW_TOKENS, max_new_tokens_given=given)
            (result,) = await ctx.run_to_completion(request.receive, [job], arrival)
            return {"output": result.text.lstrip()}

        prompts = data.input_string
        limit = ctx.settings.max_inputs_per_request
        if len(prompts) > limit:
            raise bad_request(prompt_field, f"{len(prompts)} inputs, more than the limit of {limit} per request; "
                                            "split them over several requests")
        jobs = [await ctx.prepare(prompt, params, _names(f"{prompt_field}[{index}]", used),
                                  default_max_new_tokens=DEFAULT_MAX_NEW_TOKENS, max_new_tokens_given=given)
                for index, prompt in enumerate(prompts)]
        results = await ctx.run_to_completion(request.receive, jobs, arrival)
    except RequestTimeout:
        timeout_ms = int(ctx.settings.request_timeout * 1000)
        raise ApiError(500, f"Scoring timeout after {timeout_ms} ms", kind="timeout") from None
    return [{str(index): (prompt + result.text if full_text else result.text)
             for index, (prompt, result) in enumerate(zip(prompts, results))}]
