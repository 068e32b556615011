"""The TGI API, driven by `huggingface_hub.InferenceClient(base_url=...)` against a real server."""

from __future__ import annotations

import httpx
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError


@pytest.fixture(scope="module")
def client(server):
    return InferenceClient(base_url=server.url, timeout=60)


def test_text_generation_with_details(client):
    output = client.text_generation("def f():", details=True, do_sample=False, max_new_tokens=6)
    details = output.details
    assert details.generated_tokens == len(details.tokens) == 6
    assert details.finish_reason == "length"
    assert all(token.logprob <= 0 and not token.special for token in details.tokens)
    assert "".join(token.text for token in details.tokens) == output.generated_text
    assert client.text_generation("def f():", do_sample=False, max_new_tokens=6) == output.generated_text


def test_text_generation_stream_equals_whole(client):
    for extra in ({"do_sample": False}, {"do_sample": True, "temperature": 0.8, "seed": 3}):
        whole = client.text_generation("import os", details=True, max_new_tokens=8, **extra)
        events = list(client.text_generation("import os", details=True, stream=True, max_new_tokens=8, **extra))
        assert "".join(event.token.text for event in events) == whole.generated_text
        assert events[-1].generated_text == whole.generated_text
        assert events[-1].details.finish_reason == "length" and events[-1].details.generated_tokens == 8
        assert [event.token.id for event in events] == [token.id for token in whole.details.tokens]
        texts = list(client.text_generation("import os", stream=True, max_new_tokens=8, **extra))
        assert "".join(texts) == whole.generated_text
    assert whole.details.seed == 3


def test_messages_api_through_the_tgi_client(client, server):
    # TGI serves chat on /v1/chat/completions and ignores `model`; its client sends a placeholder
    # ("dummy" from InferenceClient(base_url=...)): the reply is the one asked by the served name.
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    reply = client.chat_completion(messages, max_tokens=12, temperature=0)
    named = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": server.ctx.model_name, "messages": messages, "max_tokens": 12, "temperature": 0}).json()
    assert reply.choices[0].message.content == named["choices"][0]["message"]["content"]
    assert reply.choices[0].finish_reason == named["choices"][0]["finish_reason"]
    streamed = client.chat_completion(messages, max_tokens=12, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == reply.choices[0].message.content
    for placeholder in ("tgi", "dummy"):
        answer = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                            json={"model": placeholder, "messages": messages, "max_tokens": 2})
        assert answer.status_code == 200, answer.text
    other = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                       json={"model": "gpt-4", "messages": messages, "max_tokens": 2})
    assert other.status_code == 404 and other.json()["error"]["param"] == "model"


def test_generate_routes_full_text_stop_and_top_tokens(server):
    body = {"inputs": "x = ", "parameters": {"max_new_tokens": 4, "return_full_text": True, "details": True,
                                              "top_n_tokens": 2}}
    answer = httpx.post(server.url + "/generate", json=body).json()
    assert answer["generated_text"].startswith("x = ")
    assert all(len(top) == 2 for top in answer["details"]["top_tokens"])
    lines = [line for line in httpx.post(server.url + "/generate_stream", json=body).text.splitlines() if line]
    assert lines[-1].startswith("data:") and '"generated_text": "x = ' in lines[-1]
    first_token = answer["details"]["tokens"][0]["text"]
    if first_token.strip():
        stopped = httpx.post(server.url + "/generate", json={
            "inputs": "x = ", "parameters": {"max_new_tokens": 4, "stop": [first_token], "details": True}}).json()
        assert stopped["generated_text"] == "" and stopped["details"]["finish_reason"] == "stop_sequence"
    compat = httpx.post(server.url + "/", json={"inputs": "x = ", "parameters": {"max_new_tokens": 2}})
    assert isinstance(compat.json(), list) and set(compat.json()[0]) == {"generated_text"}


def test_decoder_input_details_score_the_prompt_like_hf(client, tiny_model_dir):
    import torch
    from transformers import GPTBigCodeForCausalLM

    output = client.text_generation("def add(a, b):\n    return", details=True, decoder_input_details=True,
                                    do_sample=False, max_new_tokens=3)
    prefill = output.details.prefill
    ids = [token.id for token in prefill]
    assert prefill[0].logprob is None and len(ids) > 5
    reference = GPTBigCodeForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(torch.tensor([ids])).logits[0, :-1], dim=-1)
    expected = logprobs.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor([token.logprob for token in prefill[1:]]), expected, rtol=1e-4, atol=1e-4)
    assert "".join(token.text for token in prefill) == "def add(a, b):\n    return"
    with pytest.raises(ValidationError, match="decoder_input_details"):  # as TGI: not when streaming
        list(client.text_generation("x", details=True, decoder_input_details=True, stream=True, max_new_tokens=2))


def test_typical_p_switches_sampling_on_and_filters(client, tiny_model_dir):
    """typical_p is a sampling warper as in TGI (sampling on, a seed reported) and reaches the
    sampler: the tokens are those the engine draws with typical_p and that seed, not those it
    draws without (test_sampling checks the filter against HF's TypicalLogitsWarper)."""
    from starchat import LLM, SamplingParams

    output = client.text_generation("def f():", typical_p=0.3, seed=5, details=True, max_new_tokens=8)
    assert output.details.seed == 5
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False)
    params = SamplingParams(do_sample=True, typical_p=0.3, seed=5, max_new_tokens=8)
    expected = llm.generate(["def f():"], params)[0].token_ids
    unfiltered = llm.generate(["def f():"], params.copy(typical_p=1.0))[0].token_ids
    assert [token.id for token in output.details.tokens] == expected != unfiltered


def test_grammar_constrains_the_text(client):
    """TGI's grammar (the huggingface_hub client's `grammar=`): a regex and a JSON schema."""
    import json
    import re

    import jsonschema

    pattern = r"(yes|no), because [a-z]{2,8}\."
    output = client.text_generation("Is it?", grammar={"type": "regex", "value": pattern}, max_new_tokens=20,
                                    details=True)
    assert re.fullmatch(pattern, output.generated_text) and output.details.finish_reason == "eos_token"
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99,
                                                                              "minimum": 0}},
              "required": ["ok", "n"], "additionalProperties": False}
    text = client.text_generation("JSON:", grammar={"type": "json", "value": schema}, max_new_tokens=30, seed=2,
                                  do_sample=True)
    jsonschema.validate(json.loads(text), schema)


def test_best_of_answers_with_the_most_likely_candidate(client, server):
    output = client.text_generation("def f(x):", best_of=3, do_sample=True, temperature=1.0, details=True,
                                    max_new_tokens=6)
    others = output.details.best_of_sequences
    assert len(others) == 2
    best = sum(token.logprob for token in output.details.tokens)
    assert all(best >= sum(token.logprob for token in other.tokens) for other in others)
    assert all(other.generated_tokens == len(other.tokens) and other.seed is not None for other in others)
    assert httpx.get(server.url + "/info").json()["max_best_of"] == 4
    with pytest.raises(ValidationError, match="best_of"):
        list(client.text_generation("x", best_of=2, do_sample=True, stream=True, max_new_tokens=2))


def test_info(server):
    info = httpx.get(server.url + "/info").json()
    assert info["model_id"] == "tiny"
    assert info["max_total_tokens"] == 512 and info["max_input_tokens"] == 511


@pytest.mark.parametrize("kwargs, field", [
    ({"max_new_tokens": 10_000}, "max_new_tokens"),
    ({"watermark": True}, "watermark"),
    ({"top_p": 1.5}, "top_p"),
    ({"best_of": 2}, "best_of"),  # without sampling
    ({"best_of": 2, "do_sample": True, "seed": 1}, "seed"),
    ({"best_of": 9, "do_sample": True}, "best_of"),  # over max_best_of
    ({"typical_p": 0.0}, "typical_p"),
    ({"grammar": {"type": "regex", "value": "[a-"}}, "grammar"),
    ({"grammar": {"type": "xml", "value": "<a/>"}}, "grammar"),
])
def test_bad_input_is_a_validation_error(client, kwargs, field):
    request = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValidationError, match=field):
        client.text_generation("hello", **request)
    assert client.text_generation("hello", max_new_tokens=2)


def test_bad_bodies_get_422_with_error_type(server):
    for body in ({"inputs": 5}, {"parameters": {}}, {"inputs": "x", "parameters": {"temperatur": 1.0}},
                 {"inputs": "", "parameters": {"max_new_tokens": 2}}):
        response = httpx.post(server.url + "/generate", json=body)
        assert response.status_code == 422, body
        assert response.json()["error_type"] == "validation" and response.json()["error"]
    assert httpx.post(server.url + "/generate", json={"inputs": "ok", "parameters": {"max_new_tokens": 1}}).status_code == 200


def test_tokenize_and_detokenize_in_both_dialects(server, tiny_model_dir):
    """Token ids and character offsets as HF's tokenizer gives them; vLLM's count for a prompt
    and for a chat as the chat route renders it; detokenize inverts; bad bodies in each API's
    error format."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "def héllo(x):\n    return x  # ünïcode"
    tokens = httpx.post(server.url + "/tokenize", json={"inputs": text}).json()
    expected = reference(text, return_offsets_mapping=True, add_special_tokens=False)
    assert [t["id"] for t in tokens] == expected["input_ids"]
    assert [(t["start"], t["stop"]) for t in tokens] == [tuple(pair) for pair in expected["offset_mapping"]]
    assert "".join(t["text"] for t in tokens) == text

    counted = httpx.post(server.url + "/tokenize", json={"prompt": text}).json()
    assert counted["tokens"] == expected["input_ids"] and counted["count"] == len(tokens)
    assert counted["max_model_len"] == 512
    assert httpx.post(server.url + "/detokenize", json={"tokens": counted["tokens"]}).json() == {"prompt": text}

    messages = [{"role": "user", "content": "Hi"}]
    chat = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    completion = httpx.post(server.url + "/v1/chat/completions",
                            json={"messages": messages, "max_tokens": 1}).json()
    assert chat["count"] == completion["usage"]["prompt_tokens"]

    bad_tgi = httpx.post(server.url + "/tokenize", json={"inputs": 5})
    assert bad_tgi.status_code == 422 and bad_tgi.json()["error_type"] == "validation"
    bad_openai = httpx.post(server.url + "/tokenize", json={"prompt": "x", "messages": messages})
    assert bad_openai.status_code == 400 and bad_openai.json()["error"]["param"] == "prompt"
    bad_ids = httpx.post(server.url + "/detokenize", json={"tokens": [10**9]})
    assert bad_ids.status_code == 400 and bad_ids.json()["error"]["param"] == "tokens"
