"""OpenAI batch files: requests in, OpenAI batch-output lines out, checked with the openai package's types."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from openai.types import BatchError, Completion
from openai.types.chat import ChatCompletion

from batch_helpers import engine, greedy, one_torch_thread, read_jsonl, reference, write_jsonl  # noqa: F401
from starchat.batch import run_batch
from starchat.chat_template import fim_prompt

MESSAGES = [{"role": "user", "content": "Write a haiku about tests."}]
EMOJI_PIECES = (36628, 227)  # "😀" in the StarCoder vocabulary (checked in the test)
HAIKU_SCHEMA = {"type": "object", "required": ["lines"], "additionalProperties": False,
                "properties": {"lines": {"type": "array", "minItems": 3, "maxItems": 3,
                                         "items": {"type": "string", "maxLength": 8}}}}
HAIKU_TOOL = {"type": "function", "function": {"name": "write_haiku", "parameters": HAIKU_SCHEMA}}
LENGTH_SCHEMA = {"type": "object", "required": ["words"], "properties": {"words": {"type": "integer", "maximum": 99}}}
LENGTH_TOOL = {"type": "function", "function": {"name": "count_words", "description": "Count words.",
                                                "parameters": LENGTH_SCHEMA}}
TOOL_CONVERSATION = MESSAGES + [
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "count_words", "arguments": '{"words": 17}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "17"}]
VERSION = r"v[0-9]\.[0-9]{1,2}\.[0-9]{1,2}"
SHARED = "# A prompt long enough to fill two blocks of the engine's KV cache, sent twice.\n" * 3


def openai_lines() -> list[dict]:
    def line(custom_id, url, body):
        return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}

    return [
        line("cmpl-1", "/v1/completions", {"model": "starchat", "prompt": "def add(a, b):", "max_tokens": 5, "temperature": 0}),
        line("chat-1", "/v1/chat/completions", {"model": "starchat", "messages": MESSAGES, "max_tokens": 6, "temperature": 0}),
        line("bad-n", "/v1/completions", {"prompt": "x", "n": 0}),
        line("echo-1", "/v1/completions", {"prompt": ["import os"], "max_tokens": 3, "temperature": 0, "echo": True}),
        line("fim-1", "/v1/completions", {"prompt": "def f(x):\n    ", "suffix": "\n    return y", "max_tokens": 4,
                                          "temperature": 0, "stop": ["\n\n"]}),
        line("penalised-1", "/v1/completions", {"prompt": "def f():", "max_tokens": 6, "temperature": 0,
                                                "frequency_penalty": 1.5, "presence_penalty": 0.5,
                                                "logit_bias": {"42": 100, "7": -100}}),
        line("bad-bias", "/v1/completions", {"prompt": "x", "logit_bias": {"forty-two": 1}}),
        line("shared-1", "/v1/completions", {"prompt": SHARED, "max_tokens": 2, "temperature": 0}),
        line("shared-2", "/v1/completions", {"prompt": SHARED, "max_tokens": 2, "temperature": 0}),
        line("json-1", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 40, "temperature": 0,
                                                "response_format": {"type": "json_schema", "json_schema": {
                                                    "name": "haiku", "schema": HAIKU_SCHEMA}}}),
        line("regex-1", "/v1/completions", {"prompt": "Version:", "max_tokens": 12, "guided_regex": VERSION}),
        line("bad-regex", "/v1/completions", {"prompt": "x", "guided_regex": "[a-"}),
        line("logprobs-1", "/v1/completions", {"prompt": "def add(a, b):", "max_tokens": 5, "temperature": 0,
                                               "logprobs": 2}),
        line("chat-logprobs", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6, "temperature": 0,
                                                       "logprobs": True, "top_logprobs": 1}),
        line("bad-top", "/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}),
        # both tokens of "😀" favoured: pieces of a character, whose bytes their text (U+FFFD) does not show
        line("chat-bytes", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3, "temperature": 0,
                                                    "logprobs": True, "top_logprobs": 1,
                                                    "logit_bias": {str(piece): 100 for piece in EMOJI_PIECES}}),
        line("tool-named", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 60, "temperature": 0,
                                                    "tools": [HAIKU_TOOL, LENGTH_TOOL],
                                                    "tool_choice": {"type": "function",
                                                                    "function": {"name": "write_haiku"}}}),
        line("tool-required", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 60, "temperature": 0,
                                                       "tools": [HAIKU_TOOL, LENGTH_TOOL], "tool_choice": "required",
                                                       "parallel_tool_calls": False}),
        line("tool-result", "/v1/chat/completions", {"messages": TOOL_CONVERSATION, "max_tokens": 5, "temperature": 0,
                                                     "tools": [LENGTH_TOOL], "tool_choice": "none"}),
        line("bad-auto", "/v1/chat/completions", {"messages": MESSAGES, "tools": [LENGTH_TOOL]}),
        line("cmpl-n", "/v1/completions", {"prompt": "def f(x):", "max_tokens": 6, "temperature": 1.0, "seed": 11,
                                           "n": 3, "logprobs": 1}),
        line("chat-n", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "n": 2}),
        line("bad-best-of", "/v1/completions", {"prompt": "x", "n": 2, "best_of": 1}),
        line("best-of", "/v1/completions", {"prompt": "def f(x):", "max_tokens": 5, "temperature": 1.0, "seed": 3,
                                            "n": 2, "best_of": 4}),
        line("echo-scored", "/v1/completions", {"prompt": "def add(a, b):\n    return", "max_tokens": 3,
                                                "temperature": 0, "echo": True, "logprobs": 1}),
        line("bad-echo-suffix", "/v1/completions", {"prompt": "x", "suffix": "y", "echo": True, "logprobs": 0}),
    ]


def test_openai_batch_round_trip(tmp_path, engine, reference):
    write_jsonl(tmp_path / "in" / "requests.jsonl", openai_lines())

    summary = run_batch(tmp_path / "in", tmp_path / "out", engine=engine, progress="none")  # format: openai, detected

    assert (summary.output_format, summary.rows_ok, summary.rows_failed) == ("openai", 19, 7)
    output = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [line["custom_id"] for line in output] == [line["custom_id"] for line in openai_lines()]
    by_id = {line["custom_id"]: line for line in output}
    assert len({line["id"] for line in output}) == 26

    completion = Completion.model_validate(by_id["cmpl-1"]["response"]["body"])
    assert by_id["cmpl-1"]["response"]["status_code"] == 200 and by_id["cmpl-1"]["error"] is None
    expected = reference.generate(["def add(a, b):"], greedy(5))[0]
    assert completion.choices[0].text == expected.text
    assert completion.usage.completion_tokens == len(expected.token_ids) and completion.model == "starchat"

    chat = ChatCompletion.model_validate(by_id["chat-1"]["response"]["body"])
    assert chat.choices[0].message.content == reference.chat(MESSAGES, greedy(6)).text

    echo = Completion.model_validate(by_id["echo-1"]["response"]["body"]).choices[0].text
    assert echo == "import os" + reference.generate(["import os"], greedy(3))[0].text

    fim = Completion.model_validate(by_id["fim-1"]["response"]["body"]).choices[0].text
    params = greedy(4)
    params.stop = ["\n\n"]
    assert fim == reference.generate([fim_prompt("def f(x):\n    ", "\n    return y")], params)[0].text

    penalised = Completion.model_validate(by_id["penalised-1"]["response"]["body"]).choices[0].text
    params = greedy(6)
    params.frequency_penalty, params.presence_penalty, params.logit_bias = 1.5, 0.5, {42: 100.0, 7: -100.0}
    assert penalised == reference.generate(["def f():"], params)[0].text
    assert "body.logit_bias" in by_id["bad-bias"]["response"]["body"]["error"]["message"]
    # The second of two equal prompts finds the first's blocks in the prefix cache.
    shared = [Completion.model_validate(by_id[key]["response"]["body"]).usage for key in ("shared-1", "shared-2")]
    assert shared[0].prompt_tokens == shared[1].prompt_tokens > 32
    assert shared[0].prompt_tokens_details.cached_tokens == 0
    assert shared[1].prompt_tokens_details.cached_tokens == (shared[1].prompt_tokens - 1) // 16 * 16

    # Structured output, judged by jsonschema and re.
    haiku = ChatCompletion.model_validate(by_id["json-1"]["response"]["body"]).choices[0]
    jsonschema.validate(json.loads(haiku.message.content), HAIKU_SCHEMA)
    assert haiku.finish_reason == "stop"
    assert re.fullmatch(VERSION, Completion.model_validate(by_id["regex-1"]["response"]["body"]).choices[0].text)
    assert "body.guided_regex" in by_id["bad-regex"]["response"]["body"]["error"]["message"]

    # Tool calls: arguments judged by jsonschema; a conversation with a tool result renders as the
    # server renders it; "auto" is refused naming the field.
    named = ChatCompletion.model_validate(by_id["tool-named"]["response"]["body"]).choices[0]
    assert named.finish_reason == "tool_calls" and named.message.content is None
    (call,) = named.message.tool_calls
    assert call.function.name == "write_haiku" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), HAIKU_SCHEMA)
    required = ChatCompletion.model_validate(by_id["tool-required"]["response"]["body"]).choices[0]
    (call,) = required.message.tool_calls  # parallel_tool_calls false: one call
    schemas = {"write_haiku": HAIKU_SCHEMA, "count_words": LENGTH_SCHEMA}
    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    result = ChatCompletion.model_validate(by_id["tool-result"]["response"]["body"]).choices[0]
    rendered = MESSAGES + [{"role": "assistant", "content": '[{"name": "count_words", "arguments": {"words": 17}}]'},
                           {"role": "user", "content": "Result of count_words:\n17"}]
    assert result.message.content == reference.chat(rendered, greedy(5)).text and result.message.tool_calls is None
    assert "body.tool_choice" in by_id["bad-auto"]["response"]["body"]["error"]["message"]

    # Log-probabilities: the engine's, in OpenAI's shapes.
    scored = Completion.model_validate(by_id["logprobs-1"]["response"]["body"]).choices[0].logprobs
    params = greedy(5)
    params.logprobs = 2
    expected = reference.generate(["def add(a, b):"], params)[0]
    # (to rounding: the batch computes other rows beside these)
    assert scored.token_logprobs == pytest.approx([t.logprob for t in expected.logprobs], abs=1e-4)
    assert "".join(scored.tokens) == Completion.model_validate(by_id["logprobs-1"]["response"]["body"]).choices[0].text
    assert all(len(top) >= 2 for top in scored.top_logprobs) and scored.text_offset[0] == 0
    chat_scored = ChatCompletion.model_validate(by_id["chat-logprobs"]["response"]["body"]).choices[0]
    params = greedy(6)
    params.logprobs = 1
    expected = reference.chat(MESSAGES, params)
    assert [entry.logprob for entry in chat_scored.logprobs.content] == pytest.approx(
        [t.logprob for t in expected.logprobs], abs=1e-4)
    assert all(len(entry.top_logprobs) == 1 for entry in chat_scored.logprobs.content)
    assert "body.top_logprobs" in by_id["bad-top"]["response"]["body"]["error"]["message"]
    assert engine.tokenizer.encode("😀") == list(EMOJI_PIECES)
    pieces = ChatCompletion.model_validate(by_id["chat-bytes"]["response"]["body"]).choices[0]
    assert [entry.token for entry in pieces.logprobs.content] == ["\ufffd"] * 3  # journaled, then written
    assert [bytes(entry.bytes) for entry in pieces.logprobs.content] == [
        engine.tokenizer.token_bytes(entry.token_id) for entry in reference.chat(MESSAGES, _forced(3)).logprobs]
    joined = b"".join(bytes(entry.bytes) for entry in pieces.logprobs.content)
    assert joined.decode("utf-8", errors="replace") == pieces.message.content
    assert by_id["cmpl-1"]["response"]["body"]["choices"][0]["logprobs"] is None  # not asked for

    bad = by_id["bad-n"]
    assert bad["response"]["status_code"] == 400 and "body.n" in bad["response"]["body"]["error"]["message"]
    assert "body.n" in BatchError.model_validate(bad["error"]).message
    failed = [json.loads(line)["custom_id"] for line in (tmp_path / "out" / "errors.jsonl").open()]
    assert failed == ["bad-n", "bad-bias", "bad-regex", "bad-top", "bad-auto", "bad-best-of", "bad-echo-suffix"]

    # Echo with logprobs scores the prompt (what evaluation harnesses send): the prompt's tokens
    # first, the first without a log-probability, each scored as the engine scores it; then the
    # generated tokens, their offsets after the echo.
    prompt = "def add(a, b):\n    return"
    # (read as JSON: the openai package's Completion type has no None for the first token's
    # log-probability, which OpenAI's API returns as null)
    scored = by_id["echo-scored"]["response"]["body"]["choices"][0]
    logprobs = scored["logprobs"]
    params = greedy(3)
    params.logprobs, params.prompt_logprobs = 1, 1
    expected = reference.generate([prompt], params)[0]
    count = len(expected.prompt_logprobs)
    assert scored["text"] == prompt + expected.text and "".join(logprobs["tokens"]) == scored["text"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx(
        [e.logprob for e in expected.prompt_logprobs[1:]] + [t.logprob for t in expected.logprobs], abs=1e-4)
    assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:i])) for i in range(count + 3)]
    assert logprobs["text_offset"][count] == len(prompt)
    assert all(len(top) >= 1 for top in logprobs["top_logprobs"][1:])
    assert "body.echo" in by_id["bad-echo-suffix"]["response"]["body"]["error"]["message"]

    # n samples per line: each a choice (sample i seeded seed + i, so they differ), each with its
    # own log-probabilities; usage counts them all; greedy samples are all the greedy text.
    several = Completion.model_validate(by_id["cmpl-n"]["response"]["body"])
    assert [choice.index for choice in several.choices] == [0, 1, 2]
    assert len({choice.text for choice in several.choices}) > 1
    for choice in several.choices:
        assert "".join(choice.logprobs.tokens) == choice.text and len(choice.logprobs.tokens) == 6
    assert several.usage.completion_tokens == 3 * 6
    chats = ChatCompletion.model_validate(by_id["chat-n"]["response"]["body"])
    assert [choice.message.content for choice in chats.choices] == [reference.chat(MESSAGES, greedy(6)).text] * 2
    assert "body.best_of" in by_id["bad-best-of"]["response"]["body"]["error"]["message"]
    best = Completion.model_validate(by_id["best-of"]["response"]["body"])
    assert [c.index for c in best.choices] == [0, 1] and all(c.logprobs is None for c in best.choices)
    assert best.usage.completion_tokens == 4 * 5  # every candidate counts


def test_lines_take_the_servers_extensions_and_bookkeeping_fields(tmp_path, engine, reference):
    # A body that works on the server works in a batch line: vLLM-style extensions (ignore_eos,
    # stop_token_ids) act as there, the chat route's bookkeeping fields are accepted and change
    # nothing; and what the server refuses (an image part) fails the row.
    prompt = "def add(a, b):"
    free = reference.generate([prompt], greedy(8))[0]
    stop_id = free.token_ids[3]
    def line(custom_id, url, body):
        return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}
    write_jsonl(tmp_path / "in" / "requests.jsonl", [
        line("stop-ids", "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                             "stop_token_ids": [stop_id], "ignore_eos": True}),
        line("tagged", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "store": False,
                                                "metadata": {"team": "docs"}, "service_tier": "auto", "user": "u-1"}),
        line("bad-ignore-eos", "/v1/completions", {"prompt": prompt, "ignore_eos": "yes"}),
        line("bad-stop-ids", "/v1/completions", {"prompt": prompt, "stop_token_ids": ["x"]}),
        line("bad-image", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "u"}}]}]}),
    ])
    summary = run_batch(tmp_path / "in", tmp_path / "out", engine=engine, progress="none")
    assert (summary.rows_ok, summary.rows_failed) == (2, 3)
    by_id = {line["custom_id"]: line for line in read_jsonl(tmp_path / "out" / "predictions.jsonl")}
    params = greedy(8)
    params.stop_token_ids, params.ignore_eos = [stop_id], True
    expected = reference.generate([prompt], params)[0]
    stopped = Completion.model_validate(by_id["stop-ids"]["response"]["body"]).choices[0]
    assert stopped.text == expected.text and stopped.finish_reason == "stop" and len(expected.token_ids) <= 4
    tagged = ChatCompletion.model_validate(by_id["tagged"]["response"]["body"]).choices[0]
    assert tagged.message.content == reference.chat(MESSAGES, greedy(6)).text
    assert "body.ignore_eos" in by_id["bad-ignore-eos"]["response"]["body"]["error"]["message"]
    assert "body.stop_token_ids" in by_id["bad-stop-ids"]["response"]["body"]["error"]["message"]
    assert "messages[0].content: part 1 is of type 'image_url'" in by_id["bad-image"]["response"]["body"]["error"]["message"]


def test_csv_rows_can_be_written_as_openai_lines(tmp_path, engine):
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"input_string": "def f():", "parameters": {"max_new_tokens": 2}}])
    run_batch(tmp_path / "in", tmp_path / "out", engine=engine, output_format="openai", progress="none")
    [line] = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert line["custom_id"] == "a.jsonl:0"
    assert Completion.model_validate(line["response"]["body"]).choices[0].text.startswith("def f():")


def test_openai_lines_of_several_samples_in_jsonl_output(tmp_path, engine, reference):
    body = {"prompt": "def f(x):", "max_tokens": 4, "temperature": 0, "n": 2}
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": body}])
    run_batch(tmp_path / "in", tmp_path / "out", engine=engine, output_format="jsonl", progress="none")
    [line] = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    expected = reference.generate(["def f(x):"], greedy(4))[0].text
    assert line["predictions"] == [expected, expected] and line["prediction"] == expected
    assert line["completion_tokens"] == 8


def test_best_of_keeps_the_candidates_with_the_highest_logprob_per_token():
    """The ranking of success_record: the best `n` of the candidates by mean log-probability per
    token (not the sum: the longer candidate with the lower sum wins), best first, equals in
    sampling order; logprobs computed only to rank are not reported."""
    from starchat.batch.requests import PreparedRequest, Sample, success_record
    from starchat.outputs import TokenLogprob
    from starchat.sampling_params import SamplingParams

    def sample(text, *logprobs):
        return Sample(text, "length", len(logprobs), [TokenLogprob(0, "t", lp) for lp in logprobs])

    candidates = [sample("a", -3.0), sample("b", -1.0, -1.0, -1.0, -1.0), sample("c", -2.0, -2.0), sample("d", -1.0),
                  sample("e", -0.5, -1.5)]
    prepared = PreparedRequest([1, 2], SamplingParams(logprobs=0), "", False, "/v1/completions", "m", n=5, keep=2,
                               report_logprobs=False)
    task = {"k": [0, 0], "file": "f", "row": 0}
    record = success_record(task, prepared, candidates, attempts=1)
    assert [choice["prediction"] for choice in record["choices"]] == ["b", "d"]
    assert record["completion_tokens"] == 10 and "logprobs" not in record["choices"][0]
    prepared.keep = 4
    record = success_record(task, prepared, candidates, attempts=1)
    assert [choice["prediction"] for choice in record["choices"]] == ["b", "d", "e", "c"]


def _forced(max_new_tokens: int):
    """Greedy with logprobs and both pieces of "😀" favoured, as the chat-bytes line asks."""
    params = greedy(max_new_tokens)
    params.logprobs, params.logit_bias = 1, {piece: 100.0 for piece in EMOJI_PIECES}
    return params
