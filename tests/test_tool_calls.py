"""Tool calling's pieces (starchat/tool_calls.py): the schema that constrains a reply, parsing a
reply into calls, rendering tool turns. The server and batch tests drive them end to end."""

from __future__ import annotations

import json

import jsonschema
import pytest

from starchat.chat_template import ChatFormatError
from starchat.sampling_params import SamplingParamsError
from starchat.tool_calls import add_system_note, render_tool_turns, tool_calling_from_openai

ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "required": ["a", "b"], "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters: an empty object


def schema_of(body: dict) -> dict:
    guided = tool_calling_from_openai(body).guided()
    assert guided.kind == "json_schema"
    return json.loads(guided.spec)


def valid(schema: dict, value) -> bool:
    try:
        jsonschema.validate(value, schema)
        return True
    except jsonschema.ValidationError:
        return False


def test_required_schema_accepts_exactly_arrays_of_calls_to_the_tools():
    schema = schema_of({"tools": [ADD, NOW], "tool_choice": "required"})
    assert valid(schema, [{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "now", "arguments": {}}])
    assert not valid(schema, [])  # at least one call
    assert not valid(schema, [{"name": "sub", "arguments": {"a": 1, "b": 2}}])  # not a tool
    assert not valid(schema, [{"name": "add", "arguments": {"a": 1}}])  # arguments follow that tool's schema
    assert not valid(schema, [{"name": "add"}])
    one = schema_of({"tools": [ADD, NOW], "tool_choice": "required", "parallel_tool_calls": False})
    assert valid(one, [{"name": "now", "arguments": {}}])
    assert not valid(one, [{"name": "now", "arguments": {}}] * 2)


def test_a_named_function_is_constrained_to_its_arguments():
    schema = schema_of({"tools": [ADD, NOW], "tool_choice": {"type": "function", "function": {"name": "add"}}})
    assert valid(schema, {"a": 1, "b": 2}) and not valid(schema, {"a": "1", "b": 2})
    assert schema_of({"tools": [ADD, NOW], "tool_choice": {"type": "function", "function": {"name": "now"}}}) == \
        {"type": "object", "properties": {}}


def test_replies_parse_into_calls_unless_incomplete():
    required = tool_calling_from_openai({"tools": [ADD, NOW], "tool_choice": "required"})
    assert required.parse('[{"name":"add","arguments":{"a":1,"b":2}},{"name":"now","arguments":{}}]') == \
        [("add", '{"a": 1, "b": 2}'), ("now", "{}")]
    assert required.parse('[{"name":"add","arguments":{"a":1,') is None  # cut short by max_tokens
    assert required.parse("[]") is None
    named = tool_calling_from_openai({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "add"}}})
    assert named.parse(' {"a": 1, "b": 2}') == [("add", '{"a": 1, "b": 2}')]  # the text itself
    assert named.parse("[1]") is None


def test_no_tool_calls_when_none_is_asked_for():
    assert tool_calling_from_openai({}) is None
    assert tool_calling_from_openai({"tools": [ADD], "tool_choice": "none"}) is None


@pytest.mark.parametrize("body,field", [
    ({"tools": [ADD]}, "tool_choice"),
    ({"tools": [ADD], "tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [ADD], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "now"}}}, "tool_choice.function.name"),
    ({"tools": "add", "tool_choice": "required"}, "tools"),
    ({"tools": [ADD, {"type": "retrieval"}], "tool_choice": "required"}, "tools[1]"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}], "tool_choice": "required"}, "tools[0].function.name"),
    ({"tools": [ADD, ADD], "tool_choice": "required"}, "tools[1].function.name"),
    ({"tools": [ADD], "tool_choice": "required", "parallel_tool_calls": "no"}, "parallel_tool_calls"),
])
def test_bad_tool_fields_are_named(body, field):
    with pytest.raises(SamplingParamsError) as raised:
        tool_calling_from_openai(body)
    assert raised.value.field == field


def test_the_tools_are_described_after_the_system_prompt():
    named = tool_calling_from_openai({"tools": [ADD, NOW], "tool_choice": {"type": "function", "function": {"name": "add"}}})
    note = named.system_note()
    assert "add" in note and json.dumps(ADD["function"]["parameters"]) in note and '"now"' not in note
    assert "now" in tool_calling_from_openai({"tools": [ADD, NOW], "tool_choice": "required"}).system_note()
    user = [{"role": "user", "content": "hi"}]
    assert add_system_note(user, "N") == [{"role": "system", "content": "N"}] + user
    assert add_system_note([{"role": "system", "content": "S"}] + user, "N") == [{"role": "system", "content": "S\n\nN"}] + user


def test_tool_turns_render_as_assistant_and_user_turns():
    messages = [{"role": "user", "content": "1+2?"},
                {"role": "assistant", "content": "Let me add.", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "3"}]}]
    assert render_tool_turns(messages) == [
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": 'Let me add.\n[{"name": "add", "arguments": {"a": 1, "b": 2}}]'},
        {"role": "user", "content": "Result of add:\n3"}]
    with pytest.raises(ChatFormatError) as raised:
        render_tool_turns(messages[:1] + messages[2:])  # a result for a call never made
    assert raised.value.field == "messages[1].tool_call_id"
