"""OpenAI's structured-output fields -> GuidedDecoding, shared by the server and the batch runner.

OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", "json_schema":
{"name", "schema", "strict", "description"}}) and vLLM's extensions `guided_json` (a schema,
as an object or its JSON text), `guided_regex`, `guided_choice` (a list of strings) and
`guided_grammar` (a Lark grammar). At most one of them may constrain a request.
"""

from __future__ import annotations

import json

from starchat.sampling_params import GuidedDecoding, SamplingParamsError

GUIDED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")


def guided_from_openai(body: dict) -> tuple[GuidedDecoding | None, str]:
    """The constraint a request body asks for and the field that asked (`response_format` when
    none does). SamplingParamsError names the field when one is malformed or two are given."""
    given: list[tuple[str, GuidedDecoding]] = []
    response_format = body.get("response_format")
    if response_format is not None:
        guided = _response_format(response_format)
        if guided is not None:
            given.append(("response_format", guided))
    if body.get("guided_json") is not None:
        schema = body["guided_json"]
        if not isinstance(schema, (dict, str)):
            raise SamplingParamsError("guided_json", "must be a JSON schema (an object or its JSON text)")
        given.append(("guided_json", GuidedDecoding("json_schema", schema if isinstance(schema, str) else json.dumps(schema))))
    if body.get("guided_regex") is not None:
        if not isinstance(body["guided_regex"], str):
            raise SamplingParamsError("guided_regex", "must be a regular expression (a string)")
        given.append(("guided_regex", GuidedDecoding("regex", body["guided_regex"])))
    if body.get("guided_choice") is not None:
        given.append(("guided_choice", GuidedDecoding("choice", json.dumps(body["guided_choice"]))))
    if body.get("guided_grammar") is not None:
        if not isinstance(body["guided_grammar"], str):
            raise SamplingParamsError("guided_grammar", "must be a Lark grammar (a string)")
        given.append(("guided_grammar", GuidedDecoding("grammar", body["guided_grammar"])))
    if len(given) > 1:
        raise SamplingParamsError(given[1][0], f"give one structured-output constraint; {given[0][0]} is given already")
    return (given[0][1], given[0][0]) if given else (None, "response_format")


def _response_format(value) -> GuidedDecoding | None:
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise SamplingParamsError("response_format", 'expected {"type": "text" | "json_object" | "json_schema"}')
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return GuidedDecoding("json_object")
    json_schema = value.get("json_schema")
    schema = json_schema.get("schema") if isinstance(json_schema, dict) else None
    if not isinstance(schema, dict):
        raise SamplingParamsError("response_format.json_schema", "type json_schema needs json_schema.schema (an object)")
    return GuidedDecoding("json_schema", json.dumps(schema))
