"""Azure ML scoring (`/score`, `/`, `/swagger.json`) with plain httpx, and the server's generic HTTP behaviour."""

from __future__ import annotations

import json

import httpx
import pytest

# The StarChat-β model card's sample request, verbatim.
MODEL_CARD_SAMPLE = """{"input_data": {"input_string": ["the meaning of life is"],
                "parameters": {"temperature": 0.5, "top_p": 0.5, "max_new_tokens": 10, "do_sample": true}}}"""


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def _still_serving(http) -> None:
    response = http.post("/score", content=MODEL_CARD_SAMPLE, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


def test_model_card_sample_verbatim(http):
    response = http.post("/score", content=MODEL_CARD_SAMPLE, headers={"content-type": "application/json"})
    assert response.status_code == 200
    answer = response.json()
    assert isinstance(answer, list) and len(answer) == 1 and list(answer[0]) == ["0"]
    assert answer[0]["0"].startswith("the meaning of life is") and len(answer[0]["0"]) > len("the meaning of life is")


def test_several_inputs_return_full_text_and_greedy_determinism(http):
    body = {"input_data": {"input_string": ["a", "def f():", "x"],
                           "parameters": {"max_new_tokens": 5, "return_full_text": False}}}
    first = http.post("/score", json=body).json()
    assert list(first[0]) == ["0", "1", "2"]
    assert http.post("/score", json=body).json() == first  # greedy by default (do_sample false)
    full = http.post("/score", json={"input_data": {"input_string": ["def f():"], "parameters": {"max_gen_len": 5}}})
    assert full.json()[0]["0"] == "def f():" + first[0]["1"]


def test_chat_variant(http):
    body = {"input_data": {"input_string": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Say hi"}],
                           "parameters": {"max_new_tokens": 6}}}
    answer = http.post("/score", json=body).json()
    assert set(answer) == {"output"} and answer["output"] == answer["output"].lstrip()


def test_liveness_swagger_and_request_ids(http):
    root = http.get("/")
    assert root.status_code == 200 and root.text == "Healthy"
    assert root.headers["x-request-id"] and root.headers["x-ms-request-id"]
    ids = {"x-request-id": "abc-123", "x-ms-client-request-id": "client-7"}
    echoed = http.get("/", headers=ids)
    assert echoed.headers["x-request-id"] == "abc-123" and echoed.headers["x-ms-client-request-id"] == "client-7"
    too_long = http.post("/score", content=MODEL_CARD_SAMPLE, headers={"x-ms-client-request-id": "x" * 101})
    assert too_long.status_code == 431 and "x-ms-client-request-id" in too_long.json()["message"]
    spec = http.get("/swagger.json").json()
    for path in ("/score", "/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
                 "/generate", "/generate_stream", "/info"):
        assert path in spec["paths"], path
    assert "post" in spec["paths"]["/"] and "get" in spec["paths"]["/"]


@pytest.mark.parametrize("body, status, words", [
    (b'{"input_data": {"input_string": ["x"]', 400, "not valid JSON"),  # malformed JSON
    (b'{"input_data": {"input_string": "the meaning of life"}}', 400, "input_data.input_string"),  # wrong type
    (b'{"input_data": {"input_string": [1, 2]}}', 400, "input_data.input_string"),  # wrong item type
    (b'{"inputs": ["x"]}', 400, "input_data"),  # missing input_data
    (b'{"input_data": {"input_string": ["x"], "parameters": {"temprature": 0.5}}}', 400, "temprature"),
    (b'{"input_data": {"input_string": ["x"], "parameters": {"max_new_tokens": "10"}}}', 400, "max_new_tokens"),
    (b'{"input_data": {"input_string": ["x"], "parameters": {"max_new_tokens": 100000}}}', 400, "max_new_tokens"),
    (b'{"input_data": {"input_string": [""]}}', 400, "input_string[0]"),  # empty input
    (b'{"input_data": {"input_string": ["\\ud800"]}}', 400, "input_string[0]"),  # lone surrogate
    (b'{"input_data": {"input_string": ["x"], "parameters": {"seed": 1e30}}}', 400, "seed"),
    (b'{"input_data": {"input_string": []}}', 400, "input_string"),
    (json.dumps({"input_data": {"input_string": ["x"] * 40}}).encode(), 400, "limit"),  # too many inputs
    (json.dumps({"input_data": {"input_string": ["word " * 600]}}).encode(), 400, "input_string[0]"),  # too long
    (b"[1, 2]", 400, "body"),
])
def test_bad_input_names_the_problem_and_server_keeps_serving(http, body, status, words):
    response = http.post("/score", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    message = response.json()["message"]
    assert words in message and "input_data" in message  # explains the expected format too
    _still_serving(http)


def test_media_type_method_size_and_unknown_route(http, server):
    form = http.post("/score", content=b"input=x", headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415 and "application/json" in form.json()["message"]
    wrong_method = http.get("/score")
    assert wrong_method.status_code == 405 and wrong_method.json()["message"]
    huge = http.post("/score", content=b'{"input_data": {"input_string": ["' + b"x" * (5 << 20) + b'"]}}',
                     headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "limit" in huge.json()["message"]
    assert http.get("/nowhere").status_code == 404
    no_content_type = httpx.post(server.url + "/score", content=MODEL_CARD_SAMPLE.encode())
    assert no_content_type.status_code == 200
    _still_serving(http)
