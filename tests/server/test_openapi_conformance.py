"""The OpenAPI description (/openapi.json, Azure ML's /swagger.json) against the server itself,
by schemathesis: requests generated from the description, valid and invalid, and every answer's
status, content type, headers and body checked against what the description gives. No input may
make a 5xx (the generator found a repetition penalty near 0 doing so), and schema-invalid input
must be refused. Left out: schemathesis's "valid input must be accepted", since some inputs are
refused for reasons a schema cannot state (a token id past this model's vocabulary, a prompt
longer than its context, min_tokens above max_tokens, adapters that are not served)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402  (hypothesis comes with schemathesis)
from schemathesis.checks import positive_data_acceptance  # noqa: E402


@pytest.fixture(scope="module")
def api_description(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


described = schemathesis.pytest.from_fixture("api_description")


@described.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_is_one_the_description_gives(case):
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
