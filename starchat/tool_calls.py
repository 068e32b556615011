"""OpenAI tool calling (`tools`, `tool_choice`) for a model that was never trained to call tools.

StarChat has no tool-call syntax of its own, so the model cannot be left to decide between
answering and calling (`tool_choice: "auto"`, which needs a model trained for it: refused, as
vLLM refuses it without a tool-call parser). What it can do is fill in calls when the request
says a call must be made, with structured output keeping the text to the calls' JSON:

- a named function (`{"type": "function", "function": {"name": ...}}`): the reply is that
  function's arguments, a JSON object following its `parameters` schema;
- `"required"`: the reply is a JSON array of one or more calls (one with
  `parallel_tool_calls: false`), each `{"name": <one of the tools>, "arguments": {...}}` with
  the arguments following that tool's schema;
- `"none"` (or no tools): tools are ignored, the reply is text.

The tools are described to the model in the system message. Earlier turns of a conversation
(an assistant message with `tool_calls`, a `tool` message with a result) are rendered into
StarChat's user/assistant turns: the calls as the JSON array above, a result as a user turn.
Shared by the server and the batch runner (both take OpenAI's JSON shapes).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from starchat.chat_template import ChatFormatError, content_text
from starchat.sampling_params import GuidedDecoding, SamplingParamsError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str
    parameters: dict  # a JSON schema of the arguments object


@dataclass(frozen=True)
class ToolCalling:
    """What a request's `tools` and `tool_choice` ask of a reply that must call tools."""

    tools: tuple[FunctionTool, ...]
    forced: str | None  # the one function every reply calls; None: one or more calls to any ("required")
    parallel: bool = True  # with "required": more than one call allowed

    def guided(self) -> GuidedDecoding:
        """The JSON schema that keeps the reply to the calls."""
        if self.forced is not None:
            return GuidedDecoding("json_schema", json.dumps(self._tool(self.forced).parameters))
        call = {"anyOf": [{"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
                           "required": ["name", "arguments"]} for tool in self.tools]}
        schema = {"type": "array", "items": call, "minItems": 1, **({} if self.parallel else {"maxItems": 1})}
        return GuidedDecoding("json_schema", json.dumps(schema))

    def system_note(self) -> str:
        """The tools as the model is told of them, after the system prompt."""
        described = [{"name": tool.name, "description": tool.description, "parameters": tool.parameters}
                     for tool in self.tools]
        if self.forced is not None:
            forced = next(tool for tool in described if tool["name"] == self.forced)
            return (f"Reply with a call to the function {self.forced}: its arguments as a JSON object.\n"
                    f"Function: {json.dumps(forced, ensure_ascii=False)}")
        how_many = "one or more calls" if self.parallel else "exactly one call"
        return (f"Reply with {how_many} to these functions, as a JSON array of objects "
                f'{{"name": <function name>, "arguments": <JSON object>}}.\n'
                f"Functions: {json.dumps(described, ensure_ascii=False)}")

    def parse(self, text: str) -> list[tuple[str, str]] | None:
        """The reply's calls as (function name, arguments as JSON text); None when the text is not
        a complete set of calls (a reply cut short by max_tokens)."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if self.forced is not None:  # the text itself, as a stream of it sends it
            return [(self.forced, text.strip())] if isinstance(value, dict) else None
        pairs = [(item.get("name"), item.get("arguments")) for item in value if isinstance(item, dict)] \
            if isinstance(value, list) else []
        if not pairs or any(not isinstance(arguments, dict) for _, arguments in pairs):
            return None
        return [(name, json.dumps(arguments, ensure_ascii=False)) for name, arguments in pairs]

    def _tool(self, name: str) -> FunctionTool:
        return next(tool for tool in self.tools if tool.name == name)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(name: str, arguments: str, call_id: str | None = None) -> dict:
    """One call in OpenAI's shape; a fresh id unless given."""
    return {"id": call_id or new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_calling_from_openai(body: dict) -> ToolCalling | None:
    """The tool calls a chat request's body asks for; None when its reply is text. Raises
    SamplingParamsError naming the field (`tools[1].function.name`, `tool_choice`, ...)."""
    tools = _tools(body.get("tools"))
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return None
    if not tools:
        raise SamplingParamsError("tool_choice", "names no tool: give the functions in tools")
    if choice == "auto":
        raise SamplingParamsError("tool_choice", '"auto" needs a model trained to decide when to call a tool, which '
                                                 'StarChat is not: pass "required" (the reply is one or more calls), '
                                                 '{"type": "function", "function": {"name": ...}} (a call to that '
                                                 'function) or "none"')
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise SamplingParamsError("parallel_tool_calls", "must be true or false")
    if choice == "required":
        return ToolCalling(tools, None, parallel is not False)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        and isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise SamplingParamsError("tool_choice", 'must be "none", "auto", "required" or '
                                                 '{"type": "function", "function": {"name": ...}}')
    if name not in {tool.name for tool in tools}:
        raise SamplingParamsError("tool_choice.function.name", f"{name!r} is not one of the tools")
    return ToolCalling(tools, name)


def _tools(value) -> tuple[FunctionTool, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SamplingParamsError("tools", "must be a list of {\"type\": \"function\", \"function\": {...}}")
    tools, seen = [], set()
    for index, entry in enumerate(value):
        where = f"tools[{index}]"
        if not isinstance(entry, dict) or entry.get("type") != "function" or not isinstance(entry.get("function"), dict):
            raise SamplingParamsError(where, 'must be {"type": "function", "function": {"name", "description", '
                                             '"parameters"}}')
        function = entry["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise SamplingParamsError(f"{where}.function.name", "must be 1-64 letters, digits, '_' or '-'")
        if name in seen:
            raise SamplingParamsError(f"{where}.function.name", f"{name!r} is given twice")
        seen.add(name)
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise SamplingParamsError(f"{where}.function.description", "must be a string")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = _NO_PARAMETERS
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise SamplingParamsError(f"{where}.function.parameters", 'must be a JSON schema of an object '
                                                                      '({"type": "object", "properties": {...}})')
        tools.append(FunctionTool(name, description, {"type": "object", **parameters}))
    return tuple(tools)


def add_system_note(messages: list[dict], note: str) -> list[dict]:
    """`messages` ({role, content}) with `note` after the system message's text (or as one)."""
    if messages and messages[0]["role"] == "system":
        system = messages[0]["content"]
        return [{"role": "system", "content": f"{system}\n\n{note}" if system else note}] + messages[1:]
    return [{"role": "system", "content": note}] + messages


def render_tool_turns(messages: list[dict]) -> list[dict]:
    """OpenAI messages with tool turns -> the dialogue format's {role, content} messages: an
    assistant message's `tool_calls` become the JSON array of calls (after its text, if any), a
    `tool` message a user turn naming the function whose result it holds. Other messages pass
    through unchanged."""
    names: dict[str, str] = {}  # call id -> function name
    rendered = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            calls = []
            for call_index, call in enumerate(message["tool_calls"]):
                function = call.get("function") or {}
                arguments = function.get("arguments", "")
                try:
                    arguments = json.loads(arguments)
                except (TypeError, ValueError):
                    raise ChatFormatError(f"messages[{index}].tool_calls[{call_index}].function.arguments",
                                              "must be the arguments as JSON text") from None
                names[call.get("id")] = function.get("name")
                calls.append({"name": function.get("name"), "arguments": arguments})
            text = _text(message.get("content"), index)
            content = json.dumps(calls, ensure_ascii=False)
            rendered.append({"role": "assistant", "content": f"{text}\n{content}" if text else content})
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in names:
                raise ChatFormatError(f"messages[{index}].tool_call_id",
                                          f"{call_id!r} is not the id of a call in an earlier assistant message")
            rendered.append({"role": "user", "content": f"Result of {names[call_id]}:\n{_text(message.get('content'), index)}"})
        else:
            rendered.append(message)
    return rendered


def _text(content, index: int) -> str:
    if content is None:
        return ""
    return str(content_text(content, f"messages[{index}].content"))
