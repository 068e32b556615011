"""The OpenAPI description (/openapi.json, Azure ML's /swagger.json) against the server itself,
by schemathesis: requests generated from the description, valid and invalid, and every answer's
status, content type, headers and body checked against what the description gives. No input may
make a 5xx (the generator found a repetition penalty near 0 and a top_p below float32's range
doing so), and schema-invalid input must be refused. With API keys, every secured route must
refuse a request without one. Left out: schemathesis's "valid input must be accepted", since some
inputs are refused for reasons a schema cannot state (a token id past this model's vocabulary, a
prompt longer than its context, min_tokens above max_tokens, adapters that are not served)."""

from __future__ import annotations

from dataclasses import replace

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402  (hypothesis comes with schemathesis)
from schemathesis.checks import positive_data_acceptance  # noqa: E402
from server_harness import RunningServer  # noqa: E402

from starchat.server.app import create_app  # noqa: E402

KEY = "conformance-key"
AUTHORIZATION = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def api_description(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


@pytest.fixture(scope="module")
def keyed_server(server):
    settings = replace(server.settings, api_key=KEY)
    running = RunningServer(create_app(settings, engine=server.ctx.engine), settings).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keyed_api_description(keyed_server):
    return schemathesis.openapi.from_url(keyed_server.url + "/openapi.json", headers=AUTHORIZATION)


described = schemathesis.pytest.from_fixture("api_description")
# (the key check is the same for every route: the long generations of the OpenAI routes add nothing here)
described_with_keys = schemathesis.pytest.from_fixture("keyed_api_description").exclude(
    path_regex="^/v1/(chat/)?completions$")


@described.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_is_one_the_description_gives(case):
    case.call_and_validate(excluded_checks=[positive_data_acceptance])


@described_with_keys.parametrize()
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
def test_with_api_keys_every_secured_route_says_so_and_refuses_requests_without_one(case):
    case.call_and_validate(headers=AUTHORIZATION, excluded_checks=[positive_data_acceptance])


def test_the_description_names_the_key_schemes_only_when_keys_are_set(server, keyed_server):
    import httpx

    open_description = httpx.get(server.url + "/openapi.json").json()
    keyed = httpx.get(keyed_server.url + "/openapi.json", headers=AUTHORIZATION).json()
    assert "securitySchemes" not in open_description["components"]
    assert set(keyed["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert "security" in keyed["paths"]["/score"]["post"] and "401" in keyed["paths"]["/score"]["post"]["responses"]
    assert "security" not in keyed["paths"]["/health"]["get"] and "security" in keyed["paths"]["/"]["post"]
    assert "401" not in open_description["paths"]["/score"]["post"]["responses"]
    # bad input: 400 in the API's own error body (TGI: 422), never FastAPI's validation shape
    score, generate = (open_description["paths"][path]["post"]["responses"] for path in ("/score", "/generate"))
    assert "422" not in score and score["400"]["content"]["application/json"]["schema"]["$ref"].endswith("AzureMLError")
    assert "400" not in generate and generate["422"]["content"]["application/json"]["schema"]["$ref"].endswith("TGIError")
    stream = open_description["paths"]["/generate_stream"]["post"]["responses"]["200"]["content"]
    assert list(stream) == ["text/event-stream"]
