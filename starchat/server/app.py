"""The ASGI app: thin routes over the serving layer, for three APIs at once.

- Azure ML scoring: `GET /` (liveness: `Healthy`), `POST /score`, `GET /swagger.json`
- OpenAI: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`
- TGI: `POST /generate`, `POST /generate_stream`, `GET /info`, `POST /` (compatibility route)
- Tokens: `POST /tokenize` (TGI's or vLLM's body), `POST /detokenize` (vLLM's)
- Operations: `GET /health` (200 once the model is loaded), `GET /metrics` (Prometheus)

The model loads in a thread after the server starts listening, so probes get 503 (not a
refused connection) while it loads.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import Body, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

import starchat
from starchat.server import serving_azureml, serving_openai, serving_tgi, serving_tokenize
from starchat.server.auth import ApiKeyMiddleware
from starchat.server.errors import ApiError, install_error_handlers
from starchat.server.metrics import ServerMetrics
from starchat.server.middleware import BodyMiddleware, RequestContextMiddleware
from starchat.server.openapi import describe_responses
from starchat.server.protocol_azureml import AzureMLScoreRequest
from starchat.server.protocol_openai import ChatCompletionRequest, CompletionRequest
from starchat.server.protocol_tgi import CompatGenerateRequest, GenerateRequest
from starchat.server.serving import ServingContext
from starchat.server.streaming import ClientDisconnected
from starchat.server.settings import ServerSettings

try:  # the playground (a static chat page) ships separately; the server runs without it
    from starchat.server.playground import mount_playground
except ImportError:  # pragma: no cover - depends on the installed files
    mount_playground = None

logger = logging.getLogger("starchat.server")

PLAYGROUND_PATH = "/playground"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; never reaches the client

AZUREML = "Azure ML scoring"
OPENAI = "OpenAI"
TGI = "Text Generation Inference"
OPERATIONS = "Operations"


def prefers_html(accept: str | None) -> bool:
    """True when the Accept header ranks text/html at least as high as anything else (a browser)."""
    if not accept:
        return False
    html, other = 0.0, 0.0
    for part in accept.split(","):
        media, *options = [piece.strip() for piece in part.split(";")]
        quality = 1.0
        for option in options:
            name, _, value = option.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media.lower() == "text/html":
            html = max(html, quality)
        elif media:
            other = max(other, quality)
    return html > 0 and html >= other


def create_app(settings: ServerSettings | None = None, *, engine=None,
               on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The app for `settings`. Pass a ready `engine` (an AsyncLLM) to share one; its owner shuts it down."""
    settings = (settings or ServerSettings()).validate()
    holder: dict[str, ServingContext] = {}
    metrics = ServerMetrics(lambda: holder["ctx"].engine_stats(), lambda: holder["ctx"].admission.in_flight)
    ctx = holder["ctx"] = ServingContext(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine is not None:
            ctx.engine = engine
            yield
            return
        closing = asyncio.Event()
        loader = asyncio.create_task(_load_engine(ctx, closing, on_load_failure))
        try:
            yield
        finally:
            closing.set()
            if ctx.engine is not None:
                logger.info("shutting the engine down")
                await asyncio.to_thread(ctx.engine.shutdown)
            elif not loader.done():
                loader.cancel()  # the loading thread finishes on its own; its engine is shut down then

    app = FastAPI(title="starchat", version=starchat.__version__, lifespan=lifespan,
                  description="StarChat / GPTBigCode serving: Azure ML scoring, OpenAI and TGI APIs.")
    app.state.ctx = ctx
    app.state.settings = settings
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _client_disconnected(request: Request, error: ClientDisconnected):
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    _add_routes(app, ctx)
    generated_openapi = app.openapi

    def openapi() -> dict:  # FastAPI's description, rewritten once to the answers the routes give
        if app.openapi_schema is None:
            app.openapi_schema = describe_responses(generated_openapi(), requires_key=bool(settings.api_keys()))
        return app.openapi_schema

    app.openapi = openapi
    playground_mounted = False
    if mount_playground is not None:
        mount_playground(app, settings)
        playground_mounted = True

    @app.get("/", tags=[AZUREML], summary="Liveness: 'Healthy' (a browser is sent to the playground)",
             response_class=PlainTextResponse)
    async def liveness(request: Request):
        if playground_mounted and prefers_html(request.headers.get("accept")):
            return RedirectResponse(PLAYGROUND_PATH, status_code=307)
        return PlainTextResponse("Healthy")

    # Outermost last: request ids and logs see everything, CORS answers preflights before the
    # key check, and the key is checked before a body is read.
    app.add_middleware(BodyMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_keys=settings.api_keys())
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["authorization", "api-key", "content-type", "x-request-id",
                                          "x-ms-client-request-id"],
                           expose_headers=["x-request-id", "x-ms-request-id", "retry-after"])
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app


async def _load_engine(ctx: ServingContext, closing: asyncio.Event, on_load_failure) -> None:
    from starchat.engine.async_llm import AsyncLLM

    config = ctx.settings.engine_config()
    logger.info("loading the model", extra={"model": config.model or "(default)", "device": config.device})
    try:
        engine = await asyncio.to_thread(AsyncLLM, config, False)
    except Exception as error:  # the server stays up and says why in /health
        ctx.load_error = f"{type(error).__name__}: {error}"
        logger.error("the model failed to load: %s", ctx.load_error)
        if on_load_failure is not None:
            on_load_failure(error)
        return
    if closing.is_set():
        await asyncio.to_thread(engine.shutdown)
        return
    ctx.engine = engine
    logger.info("model loaded; ready", extra={"model": engine.model_name, "max_model_len": engine.max_model_len})


def _add_routes(app: FastAPI, ctx: ServingContext) -> None:
    # ---- operations ----

    @app.get("/health", tags=[OPERATIONS], summary="200 when the model is loaded and the engine runs, else 503")
    async def health():
        if ctx.engine is None or not ctx.engine.is_alive():
            try:
                ctx.ready_engine()
            except ApiError as error:
                return JSONResponse({"status": "unavailable", "message": error.message}, status_code=503,
                                    headers=error.headers)
        return {"status": "ok", "model": ctx.model_name}

    @app.get("/metrics", tags=[OPERATIONS], summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus_metrics():
        return Response(ctx.metrics.render(), media_type=ctx.metrics.content_type)

    # ---- Azure ML ----

    @app.get("/swagger.json", tags=[AZUREML], summary="This API's OpenAPI description")
    async def swagger():
        return app.openapi()

    @app.post("/score", tags=[AZUREML], summary="Score: text generation or chat, as the model catalog's sample")
    async def score(body: AzureMLScoreRequest, request: Request):
        return await serving_azureml.score(ctx, body, request)

    # ---- OpenAI ----

    @app.get("/v1/models", tags=[OPENAI], summary="The served model")
    async def list_models():
        return serving_openai.models(ctx)

    @app.get("/v1/models/{model_id:path}", tags=[OPENAI], summary="One model (404 unless it is the served one)")
    async def retrieve_model(model_id: str):
        listed = serving_openai.models(ctx)["data"][0]
        if not ctx.accepts_model(model_id):
            raise ApiError(404, f"model: {model_id!r} is not served here; this server serves {ctx.model_name!r}",
                           kind="not_found", field="model", code="model_not_found")
        return listed

    @app.post("/v1/completions", tags=[OPENAI], summary="Text completion (suffix = fill-in-the-middle)")
    async def completions(body: CompletionRequest, request: Request):
        return await serving_openai.completions(ctx, body, request)

    @app.post("/v1/chat/completions", tags=[OPENAI], summary="Chat completion in StarChat's dialogue format")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await serving_openai.chat_completions(ctx, body, request)

    # ---- TGI ----

    @app.post("/generate", tags=[TGI], summary="Generate")
    async def generate(body: GenerateRequest, request: Request):
        return await serving_tgi.generate(ctx, body, request)

    @app.post("/generate_stream", tags=[TGI], summary="Generate, streamed as Server-Sent Events")
    async def generate_stream(body: GenerateRequest, request: Request):
        return await serving_tgi.stream(ctx, body, request)

    @app.get("/info", tags=[TGI], summary="Model and limits")
    async def info():
        return serving_tgi.info(ctx)

    @app.post("/tokenize", tags=[TGI, OPENAI], summary="Tokens of a text: TGI's body {inputs} or vLLM's {prompt | messages}")
    async def tokenize(body: Any = Body(...)):
        return serving_tokenize.tokenize(ctx, body)

    @app.post("/detokenize", tags=[OPENAI], summary="Text of token ids (vLLM's {tokens})")
    async def detokenize(body: Any = Body(...)):
        return serving_tokenize.detokenize(ctx, body)

    @app.post("/", tags=[TGI], summary="TGI compatibility route: a list with one answer, or a stream")
    async def compat_generate(body: CompatGenerateRequest, request: Request):
        return await serving_tgi.compat(ctx, body, request)
