"""Plain ASGI middleware (no BaseHTTPMiddleware: it would buffer streams and hide disconnects).

- RequestContextMiddleware: request ids (echoed, generated when absent, 431 when too long),
  one structured access-log line per request, request counts and durations for /metrics.
- BodyMiddleware: 413 past the size limit (from Content-Length, or while reading a chunked
  body), 415 for a body that is not JSON; the body is then replayed to the app, and the
  app's later `receive()` calls still see the client's disconnect.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid

from starchat.server.errors import ApiError, api_style, error_response
from starchat.server.metrics import ServerMetrics

logger = logging.getLogger("starchat.access")

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("starchat_request_id", default=None)

MAX_REQUEST_ID_LENGTH = 100
REQUEST_ID_HEADERS = ("x-request-id", "x-ms-request-id", "x-ms-client-request-id")

KNOWN_ROUTES = frozenset({
    "/", "/health", "/metrics", "/score", "/swagger.json", "/openapi.json", "/docs", "/redoc",
    "/v1/models", "/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream", "/info",
})


def route_label(path: str) -> str:
    """A bounded set of labels: unknown paths (scanners, typos) all count as `other`."""
    if path in KNOWN_ROUTES:
        return path
    if path.startswith("/playground"):
        return "/playground"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path, method = scope.get("path", ""), scope.get("method", "GET")
        given = {name: _header(scope, name.encode()) for name in REQUEST_ID_HEADERS}
        request_id = given["x-request-id"] or uuid.uuid4().hex
        echoed = {"x-request-id": request_id, "x-ms-request-id": given["x-ms-request-id"] or request_id}
        if given["x-ms-client-request-id"]:
            echoed["x-ms-client-request-id"] = given["x-ms-client-request-id"]
        too_long = next((name for name, value in given.items() if value and len(value) > MAX_REQUEST_ID_LENGTH), None)
        if too_long:
            request_id = uuid.uuid4().hex
            echoed = {"x-request-id": request_id, "x-ms-request-id": request_id}
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        status_holder = {"status": 500, "started": False}
        extra_headers = [(name.encode(), value.encode("latin-1")) for name, value in echoed.items()]

        async def send_with_ids(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + extra_headers
            await send(message)

        try:
            if too_long:
                error = ApiError(431, f"{too_long}: at most {MAX_REQUEST_ID_LENGTH} characters, got "
                                      f"{len(given[too_long])}", kind="header_too_large", field=too_long)
                await error_response(api_style(path, method), error)(scope, receive, send_with_ids)
            else:
                await self.app(scope, receive, send_with_ids)
        except Exception as error:  # a bug, not bad input: answer 500 (with the ids) and keep serving
            logger.exception("unexpected error while serving %s %s", method, path)
            if status_holder["started"]:
                raise
            failure = ApiError(500, f"internal error ({type(error).__name__}); request id {request_id}", kind="internal")
            await error_response(api_style(path, method), failure)(scope, receive, send_with_ids)
        finally:
            elapsed = time.perf_counter() - started
            route = route_label(path)
            status = status_holder["status"]
            self.metrics.http_requests.labels(route, method, str(status)).inc()
            self.metrics.http_duration.labels(route).observe(elapsed)
            client = scope.get("client")
            logger.info("%s %s %d %.1fms", method, path, status, elapsed * 1000,
                        extra={"method": method, "path": path, "status": status,
                               "duration_ms": round(elapsed * 1000, 1), "client": client[0] if client else None})
            request_id_var.reset(token)


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyMiddleware:
    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in _BODY_METHODS:
            return await self.app(scope, receive, send)
        style = api_style(scope.get("path", ""), scope.get("method", "POST"))
        too_large = ApiError(413, f"body: larger than the limit of {self.max_body_bytes} bytes", kind="too_large",
                             field="body")
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await error_response(style, too_large)(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await error_response(style, too_large)(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if size and content_type and content_type != "application/json" and not content_type.endswith("+json"):
            error = ApiError(415, f"content-type: {content_type} is not supported; send application/json "
                                  "(with curl: -H 'Content-Type: application/json')", kind="media_type",
                             field="content-type")
            return await error_response(style, error)(scope, receive, send)
        if size and not content_type:  # a JSON body sent without a content-type is read as JSON
            scope = dict(scope)
            scope["headers"] = [*scope.get("headers", ()), (b"content-type", b"application/json")]
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # blocks until the client disconnects

        await self.app(scope, replay, send)
