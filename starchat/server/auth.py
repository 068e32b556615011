"""API-key check: `Authorization: Bearer <key>` (OpenAI, Azure ML) or `api-key: <key>` (Azure clients).

Keys are compared with `hmac.compare_digest` against every configured key, so neither a
match nor a mismatch returns early. `/`, `/health` and `/metrics` stay open for probes and
scrapers; so does the playground's static page, which asks the user for the key itself.
"""

from __future__ import annotations

import hmac

from starchat.server.errors import ApiError, api_style, error_response

OPEN_PATHS = frozenset({"/", "/health", "/metrics"})
OPEN_PREFIXES = ("/playground",)


def is_open(path: str, method: str) -> bool:
    """Whether `method path` is served without a key."""
    if path in OPEN_PATHS:
        # `POST /` is TGI's generation route, not the liveness probe: it needs the key.
        return not (path == "/" and method.upper() == "POST")
    return path.startswith(OPEN_PREFIXES) or method.upper() == "OPTIONS"  # CORS preflight


def _headers(scope) -> dict[bytes, bytes]:
    return {key.lower(): value for key, value in scope.get("headers", ())}


def presented_key(scope) -> bytes | None:
    headers = _headers(scope)
    authorization = headers.get(b"authorization")
    if authorization:
        scheme, _, credentials = authorization.partition(b" ")
        if scheme.lower() == b"bearer" and credentials.strip():
            return credentials.strip()
    api_key = headers.get(b"api-key")
    if api_key and api_key.strip():
        return api_key.strip()
    return None


def key_matches(presented: bytes, keys: list[bytes]) -> bool:
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key)
    return matched


class ApiKeyMiddleware:
    def __init__(self, app, api_keys: list[str]):
        self.app = app
        self.keys = [key.encode("utf-8") for key in api_keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or is_open(scope.get("path", ""), scope.get("method", "GET")):
            return await self.app(scope, receive, send)
        presented = presented_key(scope)
        if presented is not None and key_matches(presented, self.keys):
            return await self.app(scope, receive, send)
        message = ("missing API key: send 'Authorization: Bearer <key>' (or an 'api-key' header)" if presented is None
                   else "invalid API key")
        error = ApiError(401, message, kind="auth", headers={"WWW-Authenticate": "Bearer"})
        await error_response(api_style(scope.get("path", ""), scope.get("method", "GET")), error)(scope, receive, send)
