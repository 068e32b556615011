"""OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`), as the `openai` client sends them.

Every OpenAI field is declared; values this server cannot honour (tool_choice "auto") are refused
by name rather than silently ignored, and unknown fields are refused too. Extensions in vLLM's style:
top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids, and structured output by
guided_json / guided_regex / guided_choice / guided_grammar besides OpenAI's response_format
(on both endpoints).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from starchat.chat_template import ChatFormatError, content_text
from starchat.tool_calls import render_tool_turns

_STRICT = ConfigDict(strict=True, extra="forbid")


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(BaseModel):
    """Fields both endpoints share."""

    model_config = _STRICT

    model: str | None = Field(None, description="The served model's id (GET /v1/models).")
    temperature: float | None = Field(None, ge=0, le=2, description="Default 1; 0 decodes greedily.")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, description="Completions per prompt.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="Up to 16 stop sequences.")
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Subtracted from the logit of every token "
                                           "already in the output.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Subtracted from a token's logit once per "
                                            "occurrence in the output.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id -> bias (-100..100) added to its logit.")
    user: str | None = None
    # Extensions (vLLM's names).
    top_k: int | None = Field(None, ge=0, description="Extension: sample among the k most likely tokens (0 = off).")
    min_p: float | None = Field(None, ge=0, le=1, description="Extension: drop tokens less likely than min_p times "
                                "the most likely one (0 = off).")
    repetition_penalty: float | None = Field(None, gt=0, description="Extension: above 1 discourages repeats.")
    min_tokens: int = Field(0, ge=0, description="Extension: fewest tokens before a stop may end the text.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past end-of-text (benchmarks).")
    stop_token_ids: list[int] | None = Field(None, description="Extension: token ids that end the text.")
    response_format: ResponseFormat | None = Field(None, description="Structured output: a JSON object, or one "
                                                   "following a JSON schema.")
    guided_json: dict[str, Any] | str | None = Field(None, description="Extension (vLLM's): a JSON schema the output follows.")
    guided_regex: str | None = Field(None, description="Extension: a regular expression the whole output matches.")
    guided_choice: list[str] | None = Field(None, description="Extension: the output is one of these strings.",
                                            json_schema_extra={"minItems": 1})
    guided_grammar: str | None = Field(None, description="Extension: a Lark grammar (llguidance's dialect) of the output.")


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="Text, texts, token ids, or lists of token ids.",
        json_schema_extra={"minLength": 1, "minItems": 1})  # (each applies to its own kind of value)
    suffix: str | None = Field(None, description="Text after the completion: fill-in-the-middle.")
    max_tokens: int | None = Field(16, ge=1, description="Most tokens to generate (default 16).")
    logprobs: int | None = Field(None, ge=0, le=20, description="Log-probabilities of the top-n tokens.")
    echo: bool = Field(False, description="Return the prompt before the completion.")
    best_of: int | None = Field(None, ge=1, description="Generate this many completions per prompt and return "
                                "the n with the highest log-probability per token (not when streaming).")

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={"examples": [
        {"model": "starchat-nano", "prompt": "def fibonacci(n):", "max_tokens": 32, "temperature": 0}]})


class TextContentPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = _STRICT

    name: str
    arguments: str = Field(..., description="The arguments as JSON text.")


class ToolCall(BaseModel):
    model_config = _STRICT

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant message's calls (earlier turns).")
    tool_call_id: str | None = Field(None, description="A tool message's call: the result it holds.")
    refusal: str | None = Field(None, description="Accepted (an assistant message sent back as received); unused.")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content):
        """Other parts (images, audio, files) get one plain reason instead of the union's errors."""
        try:
            content_text(content, "content")
        except ChatFormatError as error:
            raise ValueError(error.message) from None
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """The chat template's {role, content} messages: OpenAI's developer role is the system's, and
    tool turns (calls, results) become assistant and user turns (tool_calls.render_tool_turns).
    Raises ChatFormatError naming the message field that cannot be rendered."""
    plain = []
    for index, message in enumerate(messages):
        if message.tool_calls and message.role != "assistant":
            raise ChatFormatError(f"messages[{index}].tool_calls", "only assistant messages carry tool calls")
        if message.role == "tool" and message.tool_call_id is None:
            raise ChatFormatError(f"messages[{index}].tool_call_id", "a tool message names the call it answers")
        entry = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
        if message.tool_calls:
            entry["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        plain.append(entry)
    return render_tool_turns(plain)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    name: str = Field(..., description="The schema's name.")
    description: str | None = None
    schema_: dict[str, Any] = Field(..., alias="schema", description="The JSON schema the output follows.")
    strict: bool | None = Field(None, description="Accepted; the output always follows the schema.")


class ResponseFormat(BaseModel):
    model_config = _STRICT

    type: Literal["text", "json_object", "json_schema"] = Field(
        "text", description="text, json_object (any JSON object) or json_schema (one that follows json_schema.schema).")
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(BaseModel):
    model_config = _STRICT

    name: str = Field(..., description="1-64 letters, digits, '_' or '-'.")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments object.")
    strict: bool | None = Field(None, description="Accepted; the arguments always follow the schema.")


class ToolDefinition(BaseModel):
    model_config = _STRICT

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = _STRICT

    name: str


class NamedToolChoice(BaseModel):
    model_config = _STRICT

    type: Literal["function"]
    function: NamedFunction


class PredictedOutput(BaseModel):
    model_config = _STRICT

    type: Literal["content"]
    content: str | list[TextContentPart]


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (default: what the context leaves).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDefinition] | None = Field(None, description="Functions the reply may call (with tool_choice "
                                               "'required' or a named function).")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="'none' (text), 'required' (one or more calls) or {'type': 'function', 'function': "
                          "{'name': ...}} (a call to that function); 'auto' is refused: StarChat was not trained "
                          "to decide when to call a tool.")
    parallel_tool_calls: bool | None = Field(None, description="With 'required': false allows exactly one call.")
    # Bookkeeping fields of OpenAI's chat API: clients and frameworks set them, and none changes the
    # reply, so they are accepted (and validated) rather than refused as unknown.
    store: bool | None = Field(None, description="Accepted; nothing is stored (no stored-completions API here).")
    metadata: dict[str, str] | None = Field(None, max_length=16, description="Accepted (up to 16 pairs); not used.")
    service_tier: str | None = Field(None, description="Accepted; one tier serves every request.")
    prompt_cache_key: str | None = Field(None, description="Accepted; prefix caching is automatic.")
    safety_identifier: str | None = Field(None, description="Accepted, like user; not used.")
    # Output-shape fields a client may send with their text-only values.
    modalities: list[Literal["text"]] | None = Field(None, description="Only ['text']: the model writes text.")
    audio: None = Field(None, description="Only null: no audio output.")
    prediction: PredictedOutput | None = Field(
        None, description="Accepted; not used (a prediction only speeds a reply up: the reply is the same).")

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={"examples": [
        {"model": "starchat-nano", "messages": [{"role": "user", "content": "Write a Python hello world"}],
         "max_tokens": 64, "temperature": 0.2, "top_p": 0.95}]})
