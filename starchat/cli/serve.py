"""`starchat serve`: the real-time endpoint (Azure ML scoring, OpenAI and TGI APIs) on uvicorn."""

from __future__ import annotations

import os
import signal
from typing import List, Optional

import typer

from starchat.cli.common import MODEL_HELP, print_notice


def _env(name: str) -> str:
    return f" Env: STARCHAT_{name.upper()}."


def serve_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + _env("model")),
    host: Optional[str] = typer.Option(None, help="Address to bind; default 127.0.0.1 (this machine only)." + _env("host")),
    port: Optional[int] = typer.Option(None, help="Port; default 8000." + _env("port")),
    api_key: Optional[str] = typer.Option(None, help="Require 'Authorization: Bearer KEY' (or 'api-key: KEY') on every "
                                                     "route but /, /health and /metrics." + _env("api_key")),
    api_key_file: Optional[str] = typer.Option(None, help="File with accepted keys, one per line." + _env("api_key_file")),
    dtype: Optional[str] = typer.Option(None, help="auto, float32, bfloat16 or float16. auto: bfloat16 on a GPU; on a CPU a 16-bit checkpoint's own dtype (with the native kernels), else float32." + _env("dtype")),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N." + _env("device")),
    max_concurrent_requests: Optional[int] = typer.Option(
        None, help="Generations running at once (the engine's batch); default 64." + _env("max_concurrent_requests")),
    max_queue: Optional[int] = typer.Option(
        None, help="Generations waiting beyond those; more get 429 with Retry-After; default 128." + _env("max_queue")),
    max_input_tokens: Optional[int] = typer.Option(
        None, help="Longest prompt in tokens; default: the context minus one." + _env("max_input_tokens")),
    max_total_tokens: Optional[int] = typer.Option(
        None, help="Prompt + new tokens at most; default: the model's context." + _env("max_total_tokens")),
    max_inputs_per_request: Optional[int] = typer.Option(
        None, help="Prompts (x n) in one request; default 32." + _env("max_inputs_per_request")),
    request_timeout: Optional[float] = typer.Option(
        None, help="Seconds a request may take, then it is cancelled; default SCORING_TIMEOUT_MS or 3600."
        + _env("request_timeout")),
    cors_origins: Optional[List[str]] = typer.Option(
        None, "--cors-origins", help="Origin allowed by CORS (repeatable); CORS is off without one." + _env("cors_origins")),
    served_model_name: Optional[str] = typer.Option(
        None, help="The model id clients see (OpenAI 'model'); default: the model's name." + _env("served_model_name")),
    max_body_bytes: Optional[int] = typer.Option(None, help="Largest request body; larger get 413; default 4 MiB."
                                                 + _env("max_body_bytes")),
    shutdown_grace: Optional[float] = typer.Option(
        None, help="Seconds in-flight requests get to finish after SIGTERM; default 30." + _env("shutdown_grace")),
    kv_cache_memory_bytes: Optional[int] = typer.Option(None, help="KV-cache budget; default: sized from the machine."
                                                        + _env("kv_cache_memory_bytes")),
    max_num_batched_tokens: Optional[int] = typer.Option(
        None, help="Tokens one engine step computes at most (decodes + prompt chunks); longer prompts are "
                   "computed in chunks. Default: 512 on a CPU, 2048 on a GPU." + _env("max_num_batched_tokens")),
    quantize: Optional[str] = typer.Option(None, help="int8: weight-only int8 weights (a quarter of float32's memory)."
                                           + _env("quantize")),
    num_speculative_tokens: Optional[int] = typer.Option(
        None, help="Speculative decoding: up to this many tokens, drafted from earlier occurrences of the "
                   "sequence's last tokens (n-gram lookup), verified per step while at most 4 requests run. Greedy "
                   "requests get the same tokens, sampled ones tokens of the same distribution (requests with a seed "
                   "are not drafted for), in fewer steps when the output repeats its context. Default 0 (off)."
                   + _env("num_speculative_tokens")),
    prefix_caching: Optional[bool] = typer.Option(
        None, "--prefix-caching/--no-prefix-caching",
        help="Reuse the KV cache of prompts' already-computed prefixes (a shared system prompt, a chat's earlier "
             "turns); default on." + _env("prefix_caching")),
    log_level: Optional[str] = typer.Option(None, help="trace, debug, info, warning, error or critical; default "
                                                       "AZUREML_LOG_LEVEL or info." + _env("log_level")),
    log_format: Optional[str] = typer.Option(None, help="auto (text on a terminal, else JSON lines), text or json."
                                                        + _env("log_format")),
):
    """Serve the model over HTTP: Azure ML /score, OpenAI /v1/*, TGI /generate, /health and /metrics."""
    import logging

    import uvicorn

    from starchat.server.app import create_app
    from starchat.server.logs import configure_logging
    from starchat.server.settings import ServerSettings, SettingsError

    given = dict(locals())
    flags = {name: value for name, value in given.items() if name in ServerSettings.__dataclass_fields__}
    try:
        settings = ServerSettings.from_sources(flags)
    except SettingsError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    logger = logging.getLogger("starchat.server")
    print_notice(settings.model)
    if os.environ.get("WORKER_COUNT", "1").strip() not in ("", "1"):
        logger.warning("WORKER_COUNT=%s is ignored: one process serves all requests through one engine",
                       os.environ["WORKER_COUNT"])

    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_failure(error: BaseException) -> None:
        failures.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=on_load_failure)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            log_level=settings.log_level, lifespan="on",
                            timeout_graceful_shutdown=settings.shutdown_grace, server_header=False)
    server = uvicorn.Server(config)
    logger.info("serving on http://%s:%d (docs: /docs, OpenAPI: /swagger.json)", settings.host, settings.port)
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; ending cleanly then means exit 0.
    previous = {sig: signal.signal(sig, _after_graceful_shutdown) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    except SystemExit:  # uvicorn exits this way when it cannot bind (it has logged the system's reason)
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failures:
        typer.echo(f"error: the model failed to load: {failures[0]}", err=True)
        raise typer.Exit(1)
    if not server.started:
        typer.echo(f"error: cannot listen on {settings.host}:{settings.port} (the reason is logged above); "
                   "pass another --host or --port", err=True)
        raise typer.Exit(1)


def _after_graceful_shutdown(signum, frame) -> None:
    """The server has already stopped when this runs: nothing is left to do."""


if __name__ == "__main__":  # `python -m starchat.cli.serve`
    typer.run(serve_command)
