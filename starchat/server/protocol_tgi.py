"""Text Generation Inference bodies: `/generate`, `/generate_stream` and the compatibility route `POST /`.

Every parameter `huggingface_hub.InferenceClient.text_generation` can send is declared; those
this server cannot honour (watermark, adapters, a nonzero
frequency_penalty, prompt log-probabilities when streaming) are refused by name with 422, as
TGI refuses what it cannot do.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(strict=True, extra="forbid")


class TGIParameters(BaseModel):
    model_config = _STRICT

    max_new_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (default 100, cut to the context).")
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    do_sample: bool | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] | None = Field(None, description="Stop sequences.")
    truncate: int | None = Field(None, ge=1, description="Keep only the last N prompt tokens.")
    details: bool | None = Field(None, description="Return token ids, texts, logprobs, finish reason and seed.")
    return_full_text: bool | None = Field(None, description="Prepend the prompt (default false).")
    top_n_tokens: int | None = Field(None, ge=0, le=20, description="Also return the n most likely tokens.")
    decoder_input_details: bool | None = Field(None, description="With details: each prompt token and its "
                                               "log-probability in details.prefill (not when streaming).")
    best_of: int | None = Field(None, ge=1, description="Sample this many candidates and answer with the most "
                                "likely (highest summed log-probability); the others in details.best_of_sequences. "
                                "Needs sampling, no seed, no streaming.")
    typical_p: float | None = Field(None, gt=0, le=1, description="Locally typical sampling: keep the tokens "
                                   "whose surprise is nearest the entropy, up to this mass (1 = off).")
    watermark: bool | None = Field(None, description="Not supported.")
    frequency_penalty: float | None = Field(None, description="Only 0 is supported.")
    grammar: dict[str, Any] | None = Field(None, description='Structured output: {"type": "json", "value": '
                                           '<JSON schema>} or {"type": "regex", "value": "<regex>"}.')
    adapter_id: str | None = Field(None, description="Not supported.")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={"examples": [
        {"inputs": "def fibonacci(n):", "parameters": {"max_new_tokens": 32, "details": True}}]})

    inputs: str = Field(json_schema_extra={"minLength": 1})  # (the engine says why an empty one fails)
    parameters: TGIParameters = Field(default_factory=TGIParameters)


class CompatGenerateRequest(GenerateRequest):
    """`POST /`: a list with one answer, or the event stream when `stream` is true."""

    stream: bool | None = False
