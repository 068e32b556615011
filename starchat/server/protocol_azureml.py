"""Azure ML real-time scoring bodies, as the model catalog's StarChat-β sample sends them.

    {"input_data": {"input_string": ["the meaning of life is"],
                    "parameters": {"temperature": 0.5, "top_p": 0.5, "max_new_tokens": 10, "do_sample": true}}}

Parameter names and meanings are shared with the batch runner (starchat/azureml_params.py).
Text generation answers `[{"0": "<prompt + generated text>", "1": ...}]`; the chat variant
(`input_string` is a list of `{"role", "content"}` messages) answers `{"output": "<reply>"}`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

_STRICT = ConfigDict(strict=True, extra="forbid")
_ROLES = ("system", "user", "assistant")


class AzureMLParameters(BaseModel):
    model_config = _STRICT

    temperature: float | None = Field(None, ge=0, description="Sampling temperature; used when do_sample is true.")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    max_new_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (default 256, cut to the context).")
    max_gen_len: int | None = Field(None, ge=1, description="Old alias of max_new_tokens.")
    min_new_tokens: int | None = Field(None, ge=0, description="Fewest tokens before end-of-text may stop the text.")
    do_sample: bool | None = Field(None, description="Sample (true) or decode greedily (false, the default).")
    repetition_penalty: float | None = Field(None, gt=0)
    return_full_text: bool = Field(True, description="Prompt followed by the generated text (default), or the generated text only.")
    stop: str | list[str] | None = Field(None, description="Stop sequences; the text ends before the first one.")
    stop_sequences: str | list[str] | None = Field(None, description="Alias of stop.")
    seed: int | None = Field(None, ge=0)


class AzureMLInputData(BaseModel):
    model_config = _STRICT

    input_string: list[Any] = Field(
        ..., description="Prompts (strings), or one conversation as a list of {role, content} messages.",
        json_schema_extra={"examples": [["the meaning of life is"], [{"role": "user", "content": "Write a haiku"}]],
                           "minItems": 1},
    )
    parameters: AzureMLParameters = Field(default_factory=AzureMLParameters)

    @field_validator("input_string")
    @classmethod
    def _strings_or_messages(cls, value: list[Any]) -> list[Any]:
        if not value:
            raise ValueError("must hold at least one prompt string (or one chat message)")
        if all(isinstance(item, str) for item in value):
            return value
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise ValueError(f"item {index}: expected all strings (prompts) or all {{role, content}} objects "
                                 f"(a chat), got {type(item).__name__}")
            unknown = sorted(set(item) - {"role", "content"})
            if unknown:
                raise ValueError(f"item {index}: unknown key {unknown[0]!r}; a message has 'role' and 'content'")
            if item.get("role") not in _ROLES:
                raise ValueError(f"item {index}: role must be one of {', '.join(_ROLES)}, got {item.get('role')!r}")
            if not isinstance(item.get("content"), str):
                raise ValueError(f"item {index}: content must be a string")
        return value

    @property
    def is_chat(self) -> bool:
        return bool(self.input_string) and isinstance(self.input_string[0], dict)


class AzureMLScoreRequest(BaseModel):
    input_data: AzureMLInputData

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={"examples": [{
        "input_data": {"input_string": ["the meaning of life is"],
                       "parameters": {"temperature": 0.5, "top_p": 0.5, "max_new_tokens": 10, "do_sample": True}}}]})
