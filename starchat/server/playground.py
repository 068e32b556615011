"""The Playground: a static chat page at /playground that talks to our own /v1/chat/completions.

Everything the page loads (its script, styles, and the vendored marked, DOMPurify and
highlight.js under static/vendor/) is served from here, so it works with no internet.
The page is plain HTML: no templating, no inline script. What it needs to know about this
server (is an API key required, StarChat's named system prompts, the generation defaults)
it reads from /playground/config.json, which is open like the page; the model's name comes
from GET /v1/models, with the key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from starchat.chat_template import SYSTEM_PROMPTS
from starchat.server.settings import ServerSettings

STATIC_DIR = Path(__file__).resolve().parent / "static"
PLAYGROUND_PATH = "/playground"

# StarChat's sampling as its own generate.py and playground used it; 512 new tokens gives
# room for a code answer. The page shows these and sends them with every request.
GENERATION_DEFAULTS = {
    "temperature": 0.2,
    "top_p": 0.95,
    "top_k": 50,
    "max_tokens": 512,
    "repetition_penalty": 1.2,
    "seed": None,
}
DEFAULT_SYSTEM_PROMPT_NAME = "coding"

# No inline script, no other origin: model output that slipped past the sanitiser still could not run.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def playground_config(settings: ServerSettings) -> dict:
    """What the page needs before it has the key: nothing secret (not the key, not the model's path)."""
    return {
        "auth_required": bool(settings.api_keys()),
        "system_prompts": dict(SYSTEM_PROMPTS),
        "default_system_prompt": DEFAULT_SYSTEM_PROMPT_NAME,
        "generation_defaults": dict(GENERATION_DEFAULTS),
    }


def mount_playground(app: FastAPI, settings: ServerSettings) -> None:
    """Serve the page at /playground and its files under /playground/static/."""
    page = STATIC_DIR / "playground.html"
    config = playground_config(settings)

    async def playground_page() -> FileResponse:
        return FileResponse(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    async def playground_configuration() -> JSONResponse:
        return JSONResponse(config, headers={"Cache-Control": "no-store"})

    app.add_api_route(PLAYGROUND_PATH, playground_page, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_api_route(PLAYGROUND_PATH + "/config.json", playground_configuration, methods=["GET"], include_in_schema=False)
    app.mount(PLAYGROUND_PATH + "/static", StaticFiles(directory=STATIC_DIR), name="playground-static")
