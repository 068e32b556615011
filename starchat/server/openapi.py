"""The OpenAPI description (`/openapi.json`, and Azure ML's `/swagger.json`) as the server answers.

FastAPI documents each route's 200 answer and, for routes with a body, a 422 in its own
validation-error shape. Here bad input gets 400 (TGI's routes: 422) in the error body of the
route's API (errors.py), and the routes also answer 401 (API keys), 413 / 415 (the body), 429
(the queue is full), 503 (the model is loading) and so on; streamed answers are Server-Sent
Events. Generated clients and Azure ML's endpoint page read this description, so it says all
of that: each route's error statuses with its API's error body, and `text/event-stream` where
a route streams.
"""

from __future__ import annotations

import json

from pydantic.json_schema import models_json_schema

from starchat.server.auth import is_open
from starchat.server.errors import api_style
from starchat.server.serving_tokenize import DetokenizeRequest, TGITokenizeRequest, TokenizeRequest

_ANY_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}]}
ERROR_SCHEMAS = {
    "AzureMLError": {"type": "object", "required": ["message"], "properties": {"message": {"type": "string"}},
                     "description": "Azure ML's error body (and that of the operations routes)."},
    "OpenAIError": {"type": "object", "required": ["error"], "description": "OpenAI's error body.",
                    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"],
                                             "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                                            "param": _ANY_STRING, "code": _ANY_STRING}}}},
    "TGIError": {"type": "object", "required": ["error", "error_type"], "description": "TGI's error body.",
                 "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}}},
    "HealthUnavailable": {"type": "object", "required": ["status", "message"],
                          "properties": {"status": {"const": "unavailable"}, "message": {"type": "string"}}},
}
_BODY_OF_STYLE = {"azureml": "AzureMLError", "openai": "OpenAIError", "tgi": "TGIError"}

WHY = {
    400: "Bad input: the message names the field.",
    401: "No valid API key (this server was started with --api-key or --api-key-file).",
    404: "The model named is not the one served.",
    408: "The request's time limit (--request-timeout) passed.",
    413: "The body is larger than --max-body-bytes.",
    415: "The body is not JSON.",
    422: "Bad input: the message names the field (TGI's status for it).",
    429: "The queue is full (--max-queue): retry after the Retry-After header's seconds.",
    500: "The engine failed while generating.",
    503: "The model is still loading, or failed to load (/health says which).",
}
_GENERATION = (400, 408, 413, 415, 429, 500, 503)
# (method, path) -> the error statuses the route answers with
ROUTE_ERRORS = {
    ("post", "/score"): _GENERATION,
    ("post", "/v1/completions"): _GENERATION + (404,),
    ("post", "/v1/chat/completions"): _GENERATION + (404,),
    ("post", "/generate"): _GENERATION,
    ("post", "/generate_stream"): _GENERATION,
    ("post", "/"): _GENERATION,
    ("post", "/tokenize"): (400, 404, 413, 415, 422, 503),
    ("post", "/detokenize"): (400, 404, 413, 415, 503),
    ("get", "/v1/models/{model_id}"): (404,),
}
# With API keys, every route but the open ones (auth.is_open) also answers 401.
SECURITY_SCHEMES = {"bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
                    "apiKey": {"type": "apiKey", "in": "header", "name": "api-key", "description": "api-key: <key>"}}
# Routes whose 200 may be a stream (with "stream": true), and the one that always is.
MAY_STREAM = {("post", "/v1/completions"), ("post", "/v1/chat/completions"), ("post", "/")}
ALWAYS_STREAMS = {("post", "/generate_stream")}
# Each event's data is the API's chunk object (OpenAI's stream ends with `data: [DONE]`).
_EVENT_STREAM = {"text/event-stream": {"schema": {"description": "Server-Sent Events, one chunk object each"}}}


def _error_body(method: str, path: str, status: int) -> dict:
    if (method, path) in (("post", "/tokenize"), ("post", "/detokenize")):  # the body's dialect answers
        names = ["TGIError"] if status == 422 else ["OpenAIError", "AzureMLError"]
    else:
        names = [_BODY_OF_STYLE[api_style(path, method)]]
    schemas = [_ref(name) for name in names]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def describe_responses(schema: dict, requires_key: bool = False) -> dict:
    """Rewrite FastAPI's generated `schema` in place to the answers the routes give (`requires_key`:
    the server was started with API keys); returns it."""
    schema.setdefault("components", {}).setdefault("schemas", {}).update(ERROR_SCHEMAS)
    if requires_key:
        schema["components"]["securitySchemes"] = SECURITY_SCHEMES
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            style = api_style(path, method)
            if style != "tgi" and (method, path) != ("post", "/tokenize"):
                responses.pop("422", None)  # FastAPI's validation error: bad input is a 400 here
            statuses = ROUTE_ERRORS.get((method, path), ())
            if requires_key and not is_open(path, method):
                operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
                statuses = (401, *statuses)
            for status in statuses:
                if status == 400 and style == "tgi":
                    status = 422
                responses[str(status)] = {"description": WHY[status],
                                          "content": {"application/json": {"schema": _error_body(method, path, status)}}}
            if (method, path) in MAY_STREAM:
                responses["200"].setdefault("content", {}).update(_EVENT_STREAM)
            elif (method, path) in ALWAYS_STREAMS:
                responses["200"]["content"] = dict(_EVENT_STREAM)
    health = schema.get("paths", {}).get("/health", {}).get("get")
    if health is not None:
        health["responses"]["503"] = {"description": WHY[503], "content": {"application/json": {
            "schema": _ref("HealthUnavailable")}}}
    _describe_token_bodies(schema)
    _drop_unreferenced(schema, ("HTTPValidationError", "ValidationError"))
    return schema


def _describe_token_bodies(schema: dict) -> None:
    """/tokenize and /detokenize read their bodies themselves (two dialects): name their models."""
    models = (TGITokenizeRequest, TokenizeRequest, DetokenizeRequest)
    _, definitions = models_json_schema([(model, "validation") for model in models],
                                        ref_template="#/components/schemas/{model}")
    for name, definition in definitions.get("$defs", {}).items():
        schema["components"]["schemas"].setdefault(name, definition)
    bodies = {"/tokenize": {"anyOf": [_ref("TGITokenizeRequest"), _ref("TokenizeRequest")]},
              "/detokenize": _ref("DetokenizeRequest")}
    for path, body in bodies.items():
        operation = schema.get("paths", {}).get(path, {}).get("post")
        if operation is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _drop_unreferenced(schema: dict, names: tuple[str, ...]) -> None:
    schemas = schema["components"]["schemas"]
    for name in names:
        if name in schemas:
            rest = {key: value for key, value in schemas.items() if key != name}
            if f'"#/components/schemas/{name}"' not in json.dumps({"paths": schema["paths"], "schemas": rest}):
                del schemas[name]
