"""Error bodies as each API's clients expect them, chosen by the route that failed.

- Azure ML (`/score`, `/`, operations): `{"message": "..."}`, as azureml-inference-server-http.
- OpenAI (`/v1/...`): `{"error": {"message", "type", "param", "code"}}`; the `openai` client
  maps the status to its exception class (400 BadRequestError, 401 AuthenticationError, ...).
- TGI (`/generate`, `/generate_stream`, `/info`, `POST /`): `{"error", "error_type"}`;
  `huggingface_hub` maps `error_type` (validation, overloaded, generation) to its exceptions.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

AZUREML_EXPECTED_FORMAT = (
    'expected {"input_data": {"input_string": ["<text>", ...], "parameters": {"max_new_tokens": 64, ...}}} '
    '(or, for chat, "input_string": [{"role": "user", "content": "<text>"}, ...])'
)

TGI_ROUTES = ("/generate", "/generate_stream", "/info")

# kind -> (OpenAI type, OpenAI code, TGI error_type)
_KINDS = {
    "validation": ("invalid_request_error", None, "validation"),
    "auth": ("authentication_error", "invalid_api_key", "authentication"),
    "not_found": ("not_found_error", "not_found", "not_found"),
    "method": ("invalid_request_error", "method_not_allowed", "validation"),
    "media_type": ("invalid_request_error", "unsupported_media_type", "validation"),
    "too_large": ("invalid_request_error", "request_too_large", "validation"),
    "header_too_large": ("invalid_request_error", "request_header_too_large", "validation"),
    "overloaded": ("rate_limit_error", "rate_limit_exceeded", "overloaded"),
    "timeout": ("timeout_error", "timeout", "timeout"),
    "unavailable": ("service_unavailable_error", "service_unavailable", "unavailable"),
    "internal": ("server_error", "internal_error", "generation"),
}


class ApiError(Exception):
    """A failed request: HTTP status, a message for people and the field at fault."""

    def __init__(self, status: int, message: str, *, kind: str = "validation", field: str | None = None,
                 headers: dict[str, str] | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.field = field
        self.headers = headers or {}
        self.code = code


def bad_request(field: str | None, message: str, status: int = 400) -> ApiError:
    """Bad input, named: `field: message`."""
    return ApiError(status, f"{field}: {message}" if field else message, field=field)


def api_style(path: str, method: str = "GET") -> str:
    if path.startswith("/v1/") or path == "/v1":
        return "openai"
    if path in TGI_ROUTES or (path == "/" and method.upper() == "POST"):
        return "tgi"
    return "azureml"


def error_body(style: str, error: ApiError) -> dict:
    openai_type, openai_code, tgi_type = _KINDS.get(error.kind, _KINDS["internal"])
    if style == "openai":
        return {"error": {"message": error.message, "type": openai_type, "param": error.field,
                          "code": error.code or openai_code}}
    if style == "tgi":
        return {"error": error.message, "error_type": tgi_type}
    message = error.message
    if style == "azureml" and error.kind == "validation" and error.status == 400:
        message = f"{message}; {AZUREML_EXPECTED_FORMAT}"
    return {"message": message}


def error_response(style: str, error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(style, error), status_code=error.status, headers=error.headers)


def error_response_for(request: Request, error: ApiError) -> JSONResponse:
    return error_response(api_style(request.url.path, request.method), error)


# ---- pydantic / FastAPI validation errors -> one named field ------------------------------------

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before",
              "function-wrap", "function-plain", "literal", "tagged-union"}


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part.startswith(("function-", "literal")))


def _field_path(loc) -> str:
    parts = [part for part in loc if not _is_type_tag(part)]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def validation_error(errors: list[dict]) -> ApiError:
    """The first bad field of a pydantic error list, said plainly."""
    if not errors:
        return bad_request(None, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return bad_request("body", f"is not valid JSON ({detail})" if detail else "is not valid JSON")
    field = _field_path(first.get("loc", ()))
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        name = field.rsplit(".", 1)[-1]
        return bad_request(field, f"unknown parameter {name!r}; remove it (see /swagger.json for the accepted fields)")
    if kind == "missing":
        return bad_request(field, "is required")
    if field == "body" and kind in ("model_type", "dict_type", "model_attributes_type"):
        return bad_request("body", "must be a JSON object")
    # A union reports one error per member: gather the members' messages for the same field.
    messages = []
    for error in errors:
        if _field_path(error.get("loc", ())) == field or _field_path(error.get("loc", ())).startswith(field + "["):
            message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
            if message not in messages:
                messages.append(message)
    got = first.get("input")
    got_text = f" (got {got!r:.60})" if got is not None and not isinstance(got, (dict, list)) else ""
    return bad_request(field, " or ".join(messages) + got_text)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return error_response_for(request, error)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError):
        api_error = validation_error(list(error.errors()))
        if api_style(request.url.path, request.method) == "tgi":
            api_error.status = 422  # TGI answers bad input with 422, the others with 400
        return error_response_for(request, api_error)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException):
        if error.status_code == 404:
            api_error = ApiError(404, f"{request.method} {request.url.path}: no such route; see /swagger.json",
                                 kind="not_found")
        elif error.status_code == 405:
            # Allow: the methods of every route at this path (Starlette names only the first route's:
            # "/" is a GET route and a POST route)
            allowed = sorted({method for route in request.app.routes if getattr(route, "methods", None)
                              and route.path_regex.match(request.url.path) for method in route.methods})
            headers = {name: value for name, value in (error.headers or {}).items() if name.lower() != "allow"}
            headers["allow"] = ", ".join(allowed)
            api_error = ApiError(405, f"{request.method} is not allowed on {request.url.path}", kind="method",
                                 headers=headers)
        elif error.status_code == 400 and error.detail == "There was an error parsing the body":  # FastAPI's words
            api_error = bad_request("body", "is not valid JSON (or not UTF-8 text)")
        else:
            kind = "validation" if error.status_code < 500 else "internal"
            api_error = ApiError(error.status_code, str(error.detail), kind=kind, headers=dict(error.headers or {}))
        if api_error.status == 400 and api_style(request.url.path, request.method) == "tgi":
            api_error.status = 422  # TGI answers bad input with 422
        return error_response_for(request, api_error)
