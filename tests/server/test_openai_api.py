"""The OpenAI API, driven by the official `openai` client against a real server."""

from __future__ import annotations

import httpx
import openai
import pytest

from server_harness import metric_value
from starchat.chat_template import fim_prompt
from starchat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _good_completion(client) -> None:
    """After every bad request: the server still serves."""
    completion = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=3, temperature=0)
    assert completion.usage.completion_tokens == 3


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [model.id for model in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_streamed_equals_whole_greedy_and_seeded(client):
    for extra in ({"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "seed": 1234}):
        whole = client.completions.create(model="tiny", prompt="def fibonacci(n):", max_tokens=12, **extra)
        chunks = list(client.completions.create(model="tiny", prompt="def fibonacci(n):", max_tokens=12,
                                                stream=True, **extra))
        assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole.choices[0].text
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
        assert whole.usage.completion_tokens == 12


def test_completion_usage_in_stream_and_n_and_several_prompts(client):
    chunks = list(client.completions.create(model="tiny", prompt=["a", "b c"], n=2, max_tokens=4, temperature=0.8,
                                            seed=7, stream=True, stream_options={"include_usage": True}))
    usage_chunks = [chunk for chunk in chunks if chunk.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].choices == []
    assert usage_chunks[0].usage.completion_tokens == 4 * 4
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert sorted(texts) == [0, 1, 2, 3]
    whole = client.completions.create(model="tiny", prompt=["a", "b c"], n=2, max_tokens=4, temperature=0.8, seed=7)
    assert [choice.text for choice in whole.choices] == [texts[i] for i in range(4)]
    assert whole.choices[0].text != whole.choices[1].text  # n samples use different seeds


def test_completion_echo_suffix_logprobs_stop_and_token_prompts(client, server):
    echoed = client.completions.create(model="tiny", prompt="x = 1", max_tokens=3, temperature=0, echo=True)
    plain = client.completions.create(model="tiny", prompt="x = 1", max_tokens=3, temperature=0)
    assert echoed.choices[0].text == "x = 1" + plain.choices[0].text

    fim = client.completions.create(model="tiny", prompt="def f(x):\n    ", suffix="\n    return y", max_tokens=4,
                                    temperature=0)
    reference = client.completions.create(model="tiny", prompt=fim_prompt("def f(x):\n    ", "\n    return y"),
                                          max_tokens=4, temperature=0)
    assert fim.choices[0].text == reference.choices[0].text

    with_logprobs = client.completions.create(model="tiny", prompt="x = 1", max_tokens=3, temperature=0, logprobs=2)
    logprobs = with_logprobs.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 3
    assert all(value <= 0 for value in logprobs.token_logprobs)
    assert "".join(logprobs.tokens) == with_logprobs.choices[0].text

    token_ids = server.ctx.engine.tokenizer.encode("x = 1")
    by_ids = client.completions.create(model="tiny", prompt=token_ids, max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == plain.choices[0].text

    first = plain.choices[0].text[:2]
    if first.strip():
        stopped = client.completions.create(model="tiny", prompt="x = 1", max_tokens=3, temperature=0, stop=[first])
        assert stopped.choices[0].text == "" and stopped.choices[0].finish_reason == "stop"


def test_chat_streamed_equals_whole_and_logprobs(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write hello world in C"}]
    for extra in ({"temperature": 0}, {"temperature": 0.7, "seed": 99}):
        whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, **extra)
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, stream=True,
                                                     stream_options={"include_usage": True}, **extra))
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert streamed == whole.choices[0].message.content
        assert whole.choices[0].message.role == "assistant"
        assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    with_logprobs = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0,
                                                   logprobs=True, top_logprobs=2)
    content = with_logprobs.choices[0].logprobs.content
    assert len(content) == 3 and all(len(entry.top_logprobs) == 2 for entry in content)


def test_chat_logprobs_bytes_are_each_tokens_own_and_join_into_the_text(client, tiny_model_dir):
    """OpenAI's `bytes`: a token holding part of a character shows U+FFFD as its text, but its
    bytes are its own, and the bytes of all tokens join into the reply's bytes."""
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    pieces = tokenizer.encode("😀")  # two tokens, each part of the character
    assert len(pieces) == 2 and all(tokenizer.token_text(piece) == "\ufffd" for piece in pieces)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "An emoji?"}],
                                           max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                           logit_bias={str(piece): 100 for piece in pieces})
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    assert all(entry.token == "\ufffd" and bytes(entry.bytes) != "\ufffd".encode() for entry in content)
    assert all(bytes(entry.bytes) in {tokenizer.token_bytes(piece) for piece in pieces} for entry in content)
    assert all(bytes(top.bytes) == top.token.encode() or top.token == "\ufffd" for entry in content
               for top in entry.top_logprobs)
    joined = b"".join(bytes(entry.bytes) for entry in content)
    assert joined.decode("utf-8", errors="replace") == reply.choices[0].message.content


def test_usage_reports_prompt_tokens_served_from_the_prefix_cache(client, server):
    """OpenAI's usage.prompt_tokens_details.cached_tokens: a system prompt sent again is reused in
    whole cache blocks, and /metrics counts the tokens looked up and found."""
    system = "You answer questions about Python packaging, briefly and with one example each. " * 4
    metrics = lambda: httpx.get(server.url + "/metrics").text  # noqa: E731
    hits_before = metric_value(metrics(), "starchat_prefix_cache_hits_total")
    queries_before = metric_value(metrics(), "starchat_prefix_cache_queries_total")
    turns = []
    for question in ("What is a wheel?", "What is an sdist?"):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        turns.append((whole.usage, chunks[-1].usage))
    (first, first_streamed), (second, second_streamed) = turns
    engine = server.ctx.engine.engine
    block = engine.config.kv_block_size
    shared = len(engine.tokenizer.encode("<|system|>\n" + system))
    assert first.prompt_tokens_details.cached_tokens == 0 or first.prompt_tokens_details.cached_tokens % block == 0
    # The streamed request repeats the whole prompt: all of it but the last partial block and token.
    assert first_streamed.prompt_tokens_details.cached_tokens == (first.prompt_tokens - 1) // block * block
    assert second.prompt_tokens_details.cached_tokens >= shared // block * block - block
    assert 0 < second.prompt_tokens_details.cached_tokens < second.prompt_tokens
    assert second_streamed.prompt_tokens_details.cached_tokens == (second.prompt_tokens - 1) // block * block
    completion = client.completions.create(model="tiny", prompt=system, max_tokens=2, temperature=0)
    assert completion.usage.prompt_tokens_details.cached_tokens is not None
    text = metrics()
    found = sum(usage.prompt_tokens_details.cached_tokens for pair in turns for usage in pair)
    found += completion.usage.prompt_tokens_details.cached_tokens
    assert metric_value(text, "starchat_prefix_cache_hits_total") - hits_before == found
    assert metric_value(text, "starchat_prefix_cache_queries_total") - queries_before == (
        sum(usage.prompt_tokens for pair in turns for usage in pair) + completion.usage.prompt_tokens)


def test_echo_with_logprobs_scores_the_prompt_like_hf(client, tiny_model_dir):
    """The legacy evaluation request (echo, logprobs, a few tokens): each prompt token's
    log-probability given those before it, the first None, then the generated tokens'."""
    import torch
    from transformers import GPTBigCodeForCausalLM

    prompt = "import os\n\ndef main():\n    print(os.getcwd())"
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=2)
    logprobs = whole.choices[0].logprobs
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0, logprobs=2)
    generated = len(plain.choices[0].logprobs.tokens)
    prompt_tokens = logprobs.tokens[:-generated]
    assert "".join(prompt_tokens) == prompt and whole.choices[0].text.startswith(prompt)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.tokens[-generated:] == plain.choices[0].logprobs.tokens
    assert logprobs.token_logprobs[-generated:] == plain.choices[0].logprobs.token_logprobs
    assert logprobs.text_offset[:3] == [0, len(prompt_tokens[0]), len(prompt_tokens[0]) + len(prompt_tokens[1])]
    assert logprobs.text_offset[len(prompt_tokens)] == len(prompt)
    reference = GPTBigCodeForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = Tokenizer.from_dir(tiny_model_dir).encode(prompt)
    assert len(ids) == len(prompt_tokens) == whole.usage.prompt_tokens
    with torch.no_grad():
        hf = torch.log_softmax(reference(torch.tensor([ids])).logits[0, :-1], dim=-1)
    expected = hf.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(logprobs.token_logprobs[1:len(ids)]), expected, rtol=1e-4, atol=1e-4)
    # Each position: the prompt token and the 2 most likely (it may be one of them).
    assert all(token in top and len(top) in (2, 3) for token, top in zip(prompt_tokens[1:], logprobs.top_logprobs[1:]))
    # Streamed: the echo arrives with the prompt's log-probabilities, then the tokens.
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    streamed = [chunk.choices[0] for chunk in chunks if chunk.choices and chunk.choices[0].logprobs]
    assert streamed[0].text == prompt and streamed[0].logprobs.token_logprobs == logprobs.token_logprobs[:len(ids)]
    assert "".join(choice.text for choice in streamed) == whole.choices[0].text


def test_logit_bias_and_penalties(client, server):
    token_42 = server.ctx.engine.engine.tokenizer.token_text(42)
    forced = client.completions.create(model="tiny", prompt="def f():", max_tokens=4, temperature=0,
                                       logit_bias={"42": 100}, logprobs=0)
    assert forced.choices[0].logprobs.tokens == [token_42] * 4
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logit_bias={"42": 100}, logprobs=True)
    assert [entry.token for entry in chat.choices[0].logprobs.content] == [token_42] * 3
    plain = client.completions.create(model="tiny", prompt="def f():", max_tokens=24, temperature=0)
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        whole = client.completions.create(model="tiny", prompt="def f():", max_tokens=24, temperature=0, **penalty)
        chunks = list(client.completions.create(model="tiny", prompt="def f():", max_tokens=24, temperature=0,
                                                stream=True, **penalty))
        assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole.choices[0].text
        assert whole.choices[0].text != plain.choices[0].text


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": "8"}, "max_tokens"),  # wrong type
    ({"temperature": -1}, "temperature"),  # out of range
    ({"max_tokens": 100_000}, "max_tokens"),  # does not fit the context
    ({"prompt": "word " * 600}, "prompt"),  # longer than the context
    ({"prompt": ""}, "prompt"),  # empty
    ({"extra_body": {"bogus": 1}}, "bogus"),  # unknown field
    ({"echo": True, "logprobs": 1, "suffix": "x"}, "echo"),  # the prompt scored is not the one echoed
    ({"presence_penalty": 2.5}, "presence_penalty"),  # out of range
    ({"logit_bias": {"token": 1}}, "logit_bias"),  # keys are token ids
    ({"logit_bias": {"12": 250}}, "logit_bias"),  # out of range
    ({"logit_bias": {"999999": 1}}, "logit_bias"),  # outside the vocabulary
    ({"n": 1000}, "n"),  # too many
    ({"extra_body": {"stop_token_ids": [10**9]}}, "stop_token_ids"),  # outside the vocabulary
    ({"min_tokens": 5, "max_tokens": 2, "extra_body": {}}, "min_tokens"),
    ({"extra_body": {"guided_regex": "[a-"}}, "guided_regex"),  # does not compile
    ({"extra_body": {"guided_regex": "a+", "guided_choice": ["a"]}}, "guided_choice"),  # two constraints
    ({"extra_body": {"response_format": {"type": "json_schema"}}}, "response_format.json_schema"),
    ({"extra_body": {"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/missing"}}}}}, "guided_json"),
])
def test_completion_bad_input_names_the_field(client, kwargs, param):
    request = {"model": "tiny", "prompt": "hello", "max_tokens": 4, **kwargs}
    if "min_tokens" in request:
        request["extra_body"] = {"min_tokens": request.pop("min_tokens")}
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(**request)
    assert raised.value.status_code == 400
    error = raised.value.body
    assert error["param"] == param or error["param"].endswith(param), error
    assert error["type"] == "invalid_request_error" and error["message"]
    _good_completion(client)


def test_chat_bookkeeping_fields_are_accepted_and_change_nothing(client):
    messages = [{"role": "user", "content": "Write hello world in C"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    tagged = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, store=False,
                                            metadata={"team": "docs"}, service_tier="auto", user="u-1",
                                            prompt_cache_key="k", safety_identifier="s-1", modalities=["text"],
                                            audio=None, prediction={"type": "content", "content": "int main"})
    assert tagged.choices[0].message.content == plain.choices[0].message.content
    for field, value in (("modalities", ["text", "audio"]), ("audio", {"voice": "alloy", "format": "wav"}),
                         ("prediction", {"type": "image", "content": "x"})):
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, **{field: value})
        assert raised.value.body["param"].startswith(field), raised.value.body
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2,
                                       metadata={f"k{i}": "v" for i in range(17)})
    assert raised.value.body["param"] == "metadata"


def test_chat_bad_messages_and_unknown_model(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}], max_tokens=2)
    assert raised.value.body["param"].startswith("messages[0]")
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    assert raised.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as raised:  # a vision request: one plain reason
        client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert raised.value.body["param"] == "messages[0].content"
    assert raised.value.body["message"].startswith("messages[0].content: part 1 is of type 'image_url': this model reads text only")
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert raised.value.body["code"] == "model_not_found"
    _good_completion(client)


def test_malformed_json_gets_an_openai_error(server, client):
    response = httpx.post(server.url + "/v1/completions", content=b'{"model": "tiny", "prompt": ',
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]
    _good_completion(client)


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "tags", "size"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
                         "size": {"type": "integer", "minimum": 0, "maximum": 999}}}


def test_structured_output_through_the_openai_client(client):
    """response_format (json_schema, json_object) and vLLM's guided_* fields: the texts follow
    them, judged by json, jsonschema and re; streamed text is the same text."""
    import json
    import re

    import jsonschema

    messages = [{"role": "user", "content": "Describe a package as JSON."}]
    response_format = {"type": "json_schema", "json_schema": {"name": "package", "schema": SCHEMA, "strict": True}}
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=120, temperature=0,
                                          response_format=response_format)
    assert chat.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(chat.choices[0].message.content), SCHEMA)
    chunks = client.chat.completions.create(model="tiny", messages=messages, max_tokens=120, temperature=0,
                                            response_format=response_format, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == chat.choices[0].message.content

    sampled = client.chat.completions.create(model="tiny", messages=messages, max_tokens=120, temperature=1.0, seed=3,
                                             n=2, response_format=response_format)
    for choice in sampled.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)

    pattern = r"[0-9]{3}-[A-Z]{2,4}"
    completion = client.completions.create(model="tiny", prompt="Order number:", max_tokens=16, temperature=0.8,
                                           extra_body={"guided_regex": pattern})
    assert re.fullmatch(pattern, completion.choices[0].text) and completion.choices[0].finish_reason == "stop"
    choice = client.completions.create(model="tiny", prompt="Answer:", max_tokens=8,
                                       extra_body={"guided_choice": ["left", "right"]})
    assert choice.choices[0].text in ("left", "right")
    json_object = client.chat.completions.create(model="tiny", messages=messages, max_tokens=64, temperature=0,
                                                 response_format={"type": "json_object"})
    content = json_object.choices[0].message.content
    assert content.startswith("{")
    if json_object.choices[0].finish_reason == "stop":  # a random model may write one string to the end of its budget
        assert isinstance(json.loads(content), dict)


def test_best_of_returns_the_candidates_with_the_highest_logprob_per_token(client):
    """best_of candidates are sampled and ranked by mean token log-probability; usage counts
    every candidate. (Which candidates a seed gives is not compared with a separate request:
    requests arriving apart are batched differently, and the rounding of another kernel can flip
    a near-tied draw of this random model.)"""
    from starchat.server.serving import Generated
    from starchat.server.serving_openai import _best
    from starchat.outputs import TokenLogprob

    request = dict(model="tiny", prompt="def f(x):", max_tokens=6, temperature=1.0, seed=5,
                   extra_body={"ignore_eos": True})
    best = client.completions.create(best_of=3, **request)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None  # ranked on logprobs nobody asked to see
    assert best.usage.completion_tokens == 3 * 6
    two = client.completions.create(best_of=3, n=2, logprobs=0, **request)
    means = [sum(choice.logprobs.token_logprobs) / 6 for choice in two.choices]
    assert [choice.index for choice in two.choices] == [0, 1] and means[0] >= means[1]
    for bad in (dict(best_of=1, n=2), dict(best_of=3, stream=True)):
        with pytest.raises(openai.BadRequestError) as raised:
            client.completions.create(**{**request, **bad})
        assert raised.value.body["param"] == "best_of"

    def result(*logprobs: float) -> Generated:
        return Generated(num_prompt_tokens=1, logprobs=[TokenLogprob(0, "", lp) for lp in logprobs])

    # Per token, not summed: the longer candidate with the lower sum wins; equals keep their order.
    results = [result(-3.0), result(-1.0, -1.0, -1.0, -1.0), result(-2.0, -2.0), result(-1.0), result(-0.5, -1.5)]
    assert _best(results, 5, 2) == [1, 3] and _best(results, 5, 5) == [0, 1, 2, 3, 4]
    assert _best(results[:4] + [result(-1.0), result(-9.0)], 3, 1) == [1, 3]


def test_min_p_extension_reaches_the_sampler(client):
    """min_p = 1 keeps only the most likely token: sampling then gives the greedy text whatever
    the seed (test_sampling checks min_p against HF's MinPLogitsWarper)."""
    request = dict(model="tiny", prompt="def f(x):", max_tokens=8)
    greedy = client.completions.create(temperature=0, **request).choices[0].text
    for seed in (1, 2):
        sampled = client.completions.create(temperature=1.0, seed=seed, extra_body={"min_p": 1.0}, **request)
        assert sampled.choices[0].text == greedy
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(extra_body={"min_p": 1.5}, **request)
    assert raised.value.body["param"] == "min_p"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather at a place.",
    "parameters": {"type": "object", "required": ["location", "unit"],
                   "properties": {"location": {"type": "string", "maxLength": 12},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "required": ["zone"],
                                       "properties": {"zone": {"type": "string", "maxLength": 8}}}}}


def _arguments_follow_their_schemas(calls) -> None:
    import json

    import jsonschema

    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, CLOCK)}
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assert len({call.id for call in calls}) == len(calls)


def test_tool_calls_through_the_openai_client(client, server):
    """A named function and "required" give calls whose arguments follow the tools' schemas
    (judged by jsonschema); the prompt describes the tools in a system message; streamed calls,
    accumulated by the openai package's own stream helper, are the same calls."""
    from starchat.tool_calls import tool_calling_from_openai

    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, CLOCK], tool_choice=named,
                                           max_tokens=60, temperature=0)
    note = tool_calling_from_openai({"tools": [WEATHER, CLOCK], "tool_choice": named}).system_note()
    with_note = [{"role": "system", "content": note}] + messages
    assert reply.usage.prompt_tokens == httpx.post(server.url + "/tokenize", json={"messages": with_note}).json()["count"]
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [call.function.name for call in choice.message.tool_calls] == ["get_weather"]
    _arguments_follow_their_schemas(choice.message.tool_calls)

    with client.chat.completions.stream(model="tiny", messages=messages, tools=[WEATHER, CLOCK], tool_choice=named,
                                        max_tokens=60, temperature=0) as stream:
        events = [event.type for event in stream]
        streamed = stream.get_final_completion().choices[0]
    assert "tool_calls.function.arguments.delta" in events
    assert streamed.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]

    for parallel in (None, False):
        extra = {} if parallel is None else {"parallel_tool_calls": parallel}
        required = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, CLOCK],
                                                  tool_choice="required", max_tokens=120, temperature=1.0, seed=4, n=2,
                                                  **extra)
        for choice in required.choices:
            if choice.finish_reason == "length":  # a random model may open many calls within the budget
                assert parallel is None and choice.message.tool_calls is None and choice.message.content
                continue
            assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
            assert len(choice.message.tool_calls) == 1 or parallel is None
            _arguments_follow_their_schemas(choice.message.tool_calls)
        with client.chat.completions.stream(model="tiny", messages=messages, tools=[WEATHER, CLOCK],
                                            tool_choice="required", max_tokens=120, temperature=1.0, seed=4,
                                            **extra) as stream:
            streamed = stream.get_final_completion().choices[0]
        whole = required.choices[0]
        assert streamed.finish_reason == whole.finish_reason
        if whole.message.tool_calls:
            assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == \
                [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_a_conversation_with_tool_results(client, server):
    """The agent loop: the assistant's calls sent back as received and a tool message with the
    result are rendered into StarChat's turns (seen through /tokenize and /detokenize), and the
    next reply is text (tool_choice none)."""
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=60,
                                           temperature=0, tool_choice={"type": "function",
                                                                       "function": {"name": "get_weather"}})
    call = reply.choices[0].message.tool_calls[0]
    conversation = messages + [reply.choices[0].message,
                               {"role": "tool", "tool_call_id": call.id, "content": "4 degrees, snow"}]
    answer = client.chat.completions.create(model="tiny", messages=conversation, tools=[WEATHER], tool_choice="none",
                                            max_tokens=5, temperature=0)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason in ("stop", "length")
    as_json = [m if isinstance(m, dict) else m.model_dump(exclude_none=True) for m in conversation]
    tokens = httpx.post(server.url + "/tokenize", json={"messages": as_json}).json()["tokens"]
    prompt = httpx.post(server.url + "/detokenize", json={"tokens": tokens}).json()["prompt"]
    import json

    arguments = json.loads(call.function.arguments)
    assert ("<|assistant|>\n" + json.dumps([{"name": "get_weather", "arguments": arguments}], ensure_ascii=False)
            + "<|end|>") in prompt
    assert "<|user|>\nResult of get_weather:\n4 degrees, snow<|end|>" in prompt
    assert answer.usage.prompt_tokens == len(tokens)


@pytest.mark.parametrize("change,param", [
    ({"tool_choice": "auto"}, "tool_choice"),
    ({}, "tool_choice"),  # tools without tool_choice mean "auto"
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}], "tool_choice": "required"},
     "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "required", "messages": [{"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
     "messages[0].tool_call_id"),
    ({"tool_choice": "required", "messages": [
        {"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
                                              "function": {"name": "get_weather", "arguments": "{oops"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
])
def test_bad_tool_requests_name_the_field(client, change, param):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], "max_tokens": 4,
               **change}
    request = {key: value for key, value in request.items() if value is not None}
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(**request)
    assert raised.value.body["param"] == param, raised.value.body
    _good_completion(client)
