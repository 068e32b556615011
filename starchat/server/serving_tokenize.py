"""`POST /tokenize` and `POST /detokenize`: what the model sees of a text, and the text of token ids.

`/tokenize` speaks two dialects, told apart by the body: TGI's (`{"inputs": "..."}` -> a list
of `{"id", "text", "start", "stop"}`, character offsets into the input, errors as TGI's 422) and
vLLM's (`{"prompt": "..."}` or `{"messages": [...]}` -> `{"count", "max_model_len", "tokens"}`,
errors as OpenAI's 400). `/detokenize` is vLLM's (`{"tokens": [...]}` -> `{"prompt"}`).
Counting a prompt's tokens before sending it is what clients use these for.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from starchat.chat_template import ChatFormatError
from starchat.server.errors import ApiError, bad_request, error_body, validation_error
from starchat.server.protocol_openai import ChatMessage, template_messages
from starchat.server.serving import ServingContext

_STRICT = ConfigDict(strict=True, extra="forbid")


class TGITokenizeRequest(BaseModel):
    model_config = _STRICT

    inputs: str = Field(..., min_length=1)
    parameters: dict[str, Any] | None = None  # accepted as TGI does (they do not change the tokens)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid",
                              json_schema_extra={"anyOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = Field(True, description="With messages: end with the assistant's turn opening.")
    add_special_tokens: bool = Field(True, description="Accepted; GPTBigCode's tokenizer adds none.")


class DetokenizeRequest(BaseModel):
    model_config = _STRICT

    model: str | None = None
    tokens: list[int]


def _checked(model: type[BaseModel], body: Any) -> BaseModel:
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise validation_error(list(error.errors())) from None


def _served(ctx: ServingContext, model: str | None) -> None:
    if not ctx.accepts_model(model):
        raise ApiError(404, f"model: {model!r} is not served here; this server serves {ctx.model_name!r}",
                       kind="not_found", field="model", code="model_not_found")


def tokenize(ctx: ServingContext, body: Any) -> Any:
    style = "tgi" if isinstance(body, dict) and "inputs" in body else "openai"
    try:
        return _tgi_tokens(ctx, body) if style == "tgi" else _counted_tokens(ctx, body)
    except ApiError as error:
        if style == "tgi" and error.status == 400:
            error.status = 422  # TGI answers bad input with 422
        return JSONResponse(error_body(style, error), status_code=error.status)


def _tgi_tokens(ctx: ServingContext, body: Any) -> list[dict]:
    request = _checked(TGITokenizeRequest, body)
    encoding = ctx.ready_engine().tokenizer.backend.encode(request.inputs, add_special_tokens=False)
    return [{"id": token_id, "text": request.inputs[start:stop], "start": start, "stop": stop}
            for token_id, (start, stop) in zip(encoding.ids, encoding.offsets)]


def _counted_tokens(ctx: ServingContext, body: Any) -> dict:
    request = _checked(TokenizeRequest, body)
    _served(ctx, request.model)
    engine = ctx.ready_engine()
    if (request.prompt is None) == (request.messages is None):
        raise bad_request("prompt", "give prompt (a text) or messages (a chat), one of them")
    text = request.prompt
    if request.messages is not None:
        try:  # as the chat route renders them
            text = engine.chat_prompt(template_messages(request.messages), request.add_generation_prompt)
        except ChatFormatError as error:
            raise bad_request(error.field, error.message) from None
    tokens = engine.tokenizer.encode(text)
    return {"count": len(tokens), "max_model_len": ctx.max_total_tokens, "tokens": tokens}


def detokenize(ctx: ServingContext, body: Any) -> Any:
    try:
        request = _checked(DetokenizeRequest, body)
        _served(ctx, request.model)
        tokenizer = ctx.ready_engine().tokenizer
        try:
            return {"prompt": tokenizer.decode(request.tokens, skip_special_tokens=False)}
        except ValueError as error:
            raise bad_request("tokens", str(error)) from None
    except ApiError as error:
        return JSONResponse(error_body("openai", error), status_code=error.status)
