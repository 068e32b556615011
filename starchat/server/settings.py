"""Every knob of `starchat serve`: a flag, a `STARCHAT_*` environment variable, or an Azure ML one.

Precedence: command-line flag > `STARCHAT_*` variable > Azure ML variable > default.
Azure ML's scoring container sets `AZUREML_MODEL_DIR` (read by the model loader when no model
is given), `SCORING_TIMEOUT_MS` (the per-request timeout) and `AZUREML_LOG_LEVEL`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Mapping

from starchat.config import EngineConfig

DEFAULT_SCORING_TIMEOUT_MS = 3_600_000  # azureml-inference-server-http's default
LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical")  # uvicorn's names


class SettingsError(ValueError):
    """A setting with a bad value; names the flag and the environment variable."""


@dataclass(frozen=True)
class ServerSettings:
    model: str | None = None  # None: AZUREML_MODEL_DIR, else the embedded starchat-nano
    served_model_name: str | None = None  # the OpenAI `model` id; default: the model's name
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    api_key_file: str | None = None  # one key per line; any of them is accepted
    dtype: str = "auto"
    device: str = "auto"
    max_concurrent_requests: int = 64  # generations running at once (the engine's batch)
    max_queue: int = 128  # generations waiting for a slot; beyond that: 429
    max_input_tokens: int | None = None  # default: the context length minus one
    max_total_tokens: int | None = None  # prompt + new tokens; default: the context length
    max_inputs_per_request: int = 32  # Azure input strings, OpenAI prompts x n
    request_timeout: float = DEFAULT_SCORING_TIMEOUT_MS / 1000  # seconds
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 4 << 20
    shutdown_grace: float = 30.0  # seconds in-flight requests get to finish on SIGTERM
    log_level: str = "info"
    log_format: str = "auto"  # auto (text on a terminal, else json) | text | json
    kv_cache_memory_bytes: int | None = None
    max_num_batched_tokens: int | None = None  # tokens per engine step; default 512 on a CPU, 2048 on a GPU
    quantize: str | None = None  # None | "int8": weight-only int8
    prefix_caching: bool = True  # reuse the cache of prompts' already-computed prefixes
    num_speculative_tokens: int = 0  # n-gram drafts verified per step (not for seeded sampling); 0 = off

    # ---- derived ----------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The name clients use for the model (OpenAI `model`, TGI `model_id`)."""
        if self.served_model_name:
            return self.served_model_name
        if self.model:
            return self.model
        from starchat.model.loader import resolve_model_dir  # no download: model is None here

        return resolve_model_dir(None).name

    def api_keys(self) -> list[str]:
        keys = [self.api_key] if self.api_key else []
        if self.api_key_file:
            path = Path(self.api_key_file).expanduser()
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as error:
                raise SettingsError(f"--api-key-file: cannot read {path}: {error.strerror}") from None
            keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
            if not keys:
                raise SettingsError(f"--api-key-file: {path} holds no key")
        return keys

    def engine_config(self) -> EngineConfig:
        return EngineConfig(model=self.model, dtype=self.dtype, device=self.device,
                            max_model_len=self.max_total_tokens, max_num_seqs=self.max_concurrent_requests,
                            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                            max_num_batched_tokens=self.max_num_batched_tokens, quantize=self.quantize,
                            enable_prefix_caching=self.prefix_caching,
                            num_speculative_tokens=self.num_speculative_tokens)

    def validate(self) -> "ServerSettings":
        def positive(name: str, value, allow_zero: bool = False) -> None:
            if value is None:
                return
            if value < 0 or (value == 0 and not allow_zero):
                raise SettingsError(f"--{name.replace('_', '-')}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")

        if not 0 < self.port < 65536:
            raise SettingsError(f"--port: must be in 1..65535, got {self.port}")
        for name in ("max_concurrent_requests", "max_input_tokens", "max_total_tokens", "max_inputs_per_request",
                     "request_timeout", "max_body_bytes", "kv_cache_memory_bytes", "max_num_batched_tokens"):
            positive(name, getattr(self, name))
        positive("max_queue", self.max_queue, allow_zero=True)
        positive("num_speculative_tokens", self.num_speculative_tokens, allow_zero=True)
        positive("shutdown_grace", self.shutdown_grace, allow_zero=True)
        if self.max_total_tokens is not None and self.max_total_tokens < 2:
            raise SettingsError(f"--max-total-tokens: must be >= 2 (one prompt token and one new token), "
                                f"got {self.max_total_tokens}")
        if self.max_input_tokens and self.max_total_tokens and self.max_input_tokens >= self.max_total_tokens:
            raise SettingsError("--max-input-tokens: must be below --max-total-tokens (leave room for one new token)")
        if self.quantize not in (None, "int8"):
            raise SettingsError(f"--quantize: only int8 is supported, got {self.quantize!r}")
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(f"--log-level: one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.log_format not in ("auto", "text", "json"):
            raise SettingsError(f"--log-format: auto, text or json, got {self.log_format!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise SettingsError("--api-key: is empty")
        self.api_keys()  # a key file that cannot be read fails at startup, not at the first request
        return self

    # ---- sources ----------------------------------------------------------------------------

    @classmethod
    def from_sources(cls, flags: Mapping[str, object] | None = None,
                     environ: Mapping[str, str] | None = None) -> "ServerSettings":
        """Flags (None = not given) over STARCHAT_* over the Azure ML variables over defaults."""
        environ = os.environ if environ is None else environ
        flags = flags or {}
        values: dict[str, object] = {}
        variables: dict[str, str] = {}  # setting -> the environment variable it came from
        timeout_ms = environ.get("SCORING_TIMEOUT_MS")
        if timeout_ms:
            values["request_timeout"] = _parse("SCORING_TIMEOUT_MS", timeout_ms, float) / 1000
            variables["request_timeout"] = "SCORING_TIMEOUT_MS"
        if environ.get("AZUREML_LOG_LEVEL"):
            values["log_level"] = environ["AZUREML_LOG_LEVEL"]
            variables["log_level"] = "AZUREML_LOG_LEVEL"
        for spec in fields(cls):
            variable = env_var(spec.name)
            if environ.get(variable, "") != "":
                values[spec.name] = _parse(variable, environ[variable], _field_type(spec.name))
                variables[spec.name] = variable
        for name, value in flags.items():
            if name not in _FIELD_NAMES:
                raise SettingsError(f"unknown setting {name!r}")
            if value is not None and not (isinstance(value, (list, tuple)) and not value):
                values[name] = tuple(value) if isinstance(value, list) else value
                variables.pop(name, None)
        if "cors_origins" in values and isinstance(values["cors_origins"], str):
            values["cors_origins"] = _split_origins(values["cors_origins"])
        values["log_level"] = str(values.get("log_level", "info")).lower()
        try:
            return replace(cls(), **values).validate()
        except SettingsError as error:
            # "--max-queue: ..." about a value from STARCHAT_MAX_QUEUE names the variable the user set.
            flag, _, rest = str(error).partition(":")
            name = flag.removeprefix("--").replace("-", "_")
            if name in variables and rest:
                raise SettingsError(f"{variables[name]} ({flag}):{rest}") from None
            raise


_FIELD_NAMES = {spec.name for spec in fields(ServerSettings)}


def env_var(name: str) -> str:
    return "STARCHAT_" + name.upper()


def _field_type(name: str):
    if name in ("port", "max_concurrent_requests", "max_queue", "max_input_tokens", "max_total_tokens",
                "max_inputs_per_request", "max_body_bytes", "kv_cache_memory_bytes", "max_num_batched_tokens",
                "num_speculative_tokens"):
        return int
    if name in ("request_timeout", "shutdown_grace"):
        return float
    if name == "cors_origins":
        return _split_origins
    if name == "prefix_caching":
        return boolean
    return str


def boolean(text: str) -> bool:
    """true/false, 1/0, yes/no, on/off."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _split_origins(text: str) -> tuple[str, ...]:
    return tuple(origin.strip() for origin in text.replace(" ", ",").split(",") if origin.strip())


def _parse(variable: str, text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise SettingsError(f"{variable}={text!r}: not a valid {getattr(kind, '__name__', 'value')}") from None


