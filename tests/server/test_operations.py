"""Operations: health, metrics, cancellation on disconnect, backpressure (429), timeouts, keys, CORS, settings."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from server_harness import RunningServer, metric_value
from starchat.server.app import create_app, prefers_html
from starchat.server.settings import ServerSettings, SettingsError

LONG = {"model": "tiny", "prompt": "def main():", "max_tokens": 480, "temperature": 0, "ignore_eos": True,
        "stream": True}


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_health_and_metrics(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    text = httpx.get(server.url + "/metrics").text
    for name in ("starchat_http_requests_total", "starchat_time_to_first_token_seconds_bucket",
                 "starchat_inter_token_latency_seconds_bucket", "starchat_e2e_request_latency_seconds_bucket",
                 "starchat_prompt_tokens_total", "starchat_generation_tokens_total", "starchat_num_requests_running",
                 "starchat_num_requests_waiting", "starchat_kv_cache_usage_ratio", "starchat_prefix_cache_queries_total",
                 "starchat_prefix_cache_hits_total"):
        assert name in text, name
    assert metric_value(text, "starchat_http_requests_total",
                        'method="POST",route="/v1/completions",status="200"') >= 1


def test_disconnect_mid_stream_cancels_and_frees_the_cache(server):
    def metrics():
        return httpx.get(server.url + "/metrics").text

    aborted_before = metric_value(metrics(), "starchat_generations_finished_total", 'finish_reason="abort"')
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", server.url + "/v1/completions", json=LONG) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            running = metric_value(metrics(), "starchat_num_requests_running")
            assert running == 1 and metric_value(metrics(), "starchat_kv_cache_usage_ratio") > 0
        # leaving the block closes the connection mid-stream
    _wait_for(lambda: metric_value(metrics(), "starchat_generations_finished_total", 'finish_reason="abort"')
              == aborted_before + 1)
    text = metrics()
    assert metric_value(text, "starchat_num_requests_running") == 0
    assert metric_value(text, "starchat_kv_cache_usage_ratio") == 0
    assert metric_value(text, "starchat_requests_in_flight") == 0
    follow_up = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert follow_up.status_code == 200


def test_disconnect_while_waiting_for_a_whole_answer_cancels_too(server):
    def aborted() -> float:
        return metric_value(httpx.get(server.url + "/metrics").text, "starchat_generations_finished_total",
                            'finish_reason="abort"')

    before = aborted()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        # The whole answer takes 0.2-0.3 s on the tiny model here: logprobs make each step slower,
        # and the client leaves well before the end (it had left after it, in one run of 0.3 s).
        httpx.post(server.url + "/v1/completions", json={**LONG, "stream": False, "logprobs": 5}, timeout=0.1)
    _wait_for(lambda: aborted() == before + 1)
    _wait_for(lambda: server.ctx.engine.stats().kv_cache_used_blocks == 0)
    assert server.ctx.admission.in_flight == 0


def test_queue_full_answers_429_with_retry_after(make_server):
    small = make_server(max_concurrent_requests=1, max_queue=0)
    client = openai.OpenAI(base_url=small.url + "/v1", api_key="x", max_retries=0)
    with httpx.Client(timeout=30) as streaming:
        with streaming.stream("POST", small.url + "/v1/completions", json=LONG) as response:
            lines = response.iter_lines()  # keep a reference: a dropped iterator closes the stream
            assert next(lines).startswith("data: ")
            with pytest.raises(openai.RateLimitError) as raised:
                client.completions.create(model="tiny", prompt="x", max_tokens=2)
            assert raised.value.response.headers["retry-after"] == "1"
            tgi = httpx.post(small.url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}})
            assert tgi.status_code == 429 and tgi.json()["error_type"] == "overloaded"
            score = httpx.post(small.url + "/score", json={"input_data": {"input_string": ["x"]}})
            assert score.status_code == 429 and score.headers["retry-after"] == "1"
    _wait_for(lambda: small.ctx.admission.in_flight == 0)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_request_timeout(make_server):
    quick = make_server(request_timeout=0.05)
    score = httpx.post(quick.url + "/score", json={"input_data": {"input_string": ["x"],
                                                                  "parameters": {"max_new_tokens": 480}}})
    assert score.status_code == 500 and score.json()["message"] == "Scoring timeout after 50 ms"
    completion = httpx.post(quick.url + "/v1/completions", json={**LONG, "stream": False})
    assert completion.status_code == 408 and completion.json()["error"]["code"] == "timeout"
    streamed = httpx.post(quick.url + "/v1/completions", json=LONG).text
    assert '"code": "timeout"' in streamed and streamed.rstrip().endswith("data: [DONE]")
    _wait_for(lambda: quick.ctx.engine.stats().num_running == 0)
    assert quick.ctx.engine.stats().kv_cache_used_blocks == 0


def test_api_key(make_server):
    locked = make_server(api_key="s3cret")
    assert httpx.get(locked.url + "/").text == "Healthy"  # probes stay open
    assert httpx.get(locked.url + "/health").status_code == 200
    assert httpx.get(locked.url + "/metrics").status_code == 200
    missing = httpx.post(locked.url + "/score", json={"input_data": {"input_string": ["x"]}})
    assert missing.status_code == 401 and "API key" in missing.json()["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=locked.url + "/v1", api_key="wrong", max_retries=0).models.list()
    tgi = httpx.post(locked.url + "/", json={"inputs": "x", "parameters": {"max_new_tokens": 1}})
    assert tgi.status_code == 401 and tgi.json()["error_type"] == "authentication"
    good = openai.OpenAI(base_url=locked.url + "/v1", api_key="s3cret", max_retries=0)
    assert good.models.list().data[0].id == "tiny"
    azure = httpx.post(locked.url + "/score", headers={"api-key": "s3cret"},
                       json={"input_data": {"input_string": ["x"], "parameters": {"max_new_tokens": 1}}})
    assert azure.status_code == 200


def test_cors_off_by_default_and_on_when_configured(server, make_server):
    preflight = {"origin": "https://example.com", "access-control-request-method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(server.url + "/v1/completions", headers=preflight).headers
    open_cors = make_server(cors_origins=("https://example.com",))
    response = httpx.options(open_cors.url + "/v1/completions", headers=preflight)
    assert response.headers["access-control-allow-origin"] == "https://example.com"


def test_health_is_503_while_the_model_loads(monkeypatch, server):
    import threading

    from starchat.engine import async_llm

    release = threading.Event()

    class SlowAsyncLLM(async_llm.AsyncLLM):
        def __init__(self, *args, **kwargs):
            release.wait(30)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(async_llm, "AsyncLLM", SlowAsyncLLM)
    running = RunningServer(create_app(server.settings), server.settings).start(wait_healthy=False)
    try:
        loading = httpx.get(running.url + "/health")
        assert loading.status_code == 503 and "loading" in loading.json()["message"]
        assert httpx.get(running.url + "/").text == "Healthy"
        completion = httpx.post(running.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert completion.status_code == 503 and completion.headers["retry-after"]
        release.set()
        _wait_for(lambda: httpx.get(running.url + "/health").status_code == 200, timeout=60)
    finally:
        release.set()
        running.stop()


def test_health_is_503_when_the_model_cannot_load(tmp_path):
    failures = []
    settings = ServerSettings(model=str(tmp_path / "missing"))
    running = RunningServer(create_app(settings, on_load_failure=failures.append), settings).start(wait_healthy=False)
    try:
        _wait_for(lambda: bool(failures))
        health = httpx.get(running.url + "/health")
        assert health.status_code == 503 and "failed to load" in health.json()["message"]
        assert httpx.get(running.url + "/").text == "Healthy"  # alive, not ready
        score = httpx.post(running.url + "/score", json={"input_data": {"input_string": ["x"]}})
        assert score.status_code == 503
    finally:
        running.stop()


def test_settings_precedence_and_validation(tmp_path):
    environ = {"STARCHAT_PORT": "9001", "SCORING_TIMEOUT_MS": "2500", "AZUREML_LOG_LEVEL": "DEBUG",
               "STARCHAT_CORS_ORIGINS": "https://a.example, https://b.example"}
    assert (ServerSettings().host, ServerSettings().port) == ("127.0.0.1", 8000)  # loopback unless asked
    settings = ServerSettings.from_sources({"port": 9002, "host": None}, environ)
    assert (settings.port, settings.host, settings.request_timeout, settings.log_level) == (9002, "127.0.0.1", 2.5, "debug")
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert ServerSettings.from_sources({}, {**environ, "STARCHAT_REQUEST_TIMEOUT": "7"}).request_timeout == 7
    budget = ServerSettings.from_sources({}, {"STARCHAT_MAX_NUM_BATCHED_TOKENS": "1024"})
    assert budget.engine_config().max_num_batched_tokens == 1024
    assert ServerSettings.from_sources({"max_num_batched_tokens": 256}, {}).engine_config().max_num_batched_tokens == 256
    assert ServerSettings().engine_config().enable_prefix_caching
    assert not ServerSettings.from_sources({}, {"STARCHAT_PREFIX_CACHING": "false"}).engine_config().enable_prefix_caching
    assert not ServerSettings.from_sources({"prefix_caching": False}, {"STARCHAT_PREFIX_CACHING": "1"}).prefix_caching
    with pytest.raises(SettingsError, match="STARCHAT_PREFIX_CACHING='maybe': not a valid boolean"):
        ServerSettings.from_sources({}, {"STARCHAT_PREFIX_CACHING": "maybe"})
    key_file = tmp_path / "keys"
    key_file.write_text("# rotated keys\nkey-one\nkey-two\n")
    assert ServerSettings(api_key_file=str(key_file)).api_keys() == ["key-one", "key-two"]
    for bad in ({"port": 0}, {"max_queue": -1}, {"request_timeout": 0}, {"max_num_batched_tokens": 0},
                {"log_level": "loud"}, {"max_total_tokens": 1}):
        with pytest.raises(SettingsError, match=next(iter(bad)).replace("_", "-")):
            ServerSettings.from_sources(bad, {})
    assert ServerSettings.from_sources({}, {"AZUREML_LOG_LEVEL": "WARNING"}).log_level == "warning"
    # A bad value from the environment names the variable the user set.
    with pytest.raises(SettingsError, match=r"AZUREML_LOG_LEVEL \(--log-level\): one of .* got 'verbose'"):
        ServerSettings.from_sources({}, {"AZUREML_LOG_LEVEL": "verbose"})
    with pytest.raises(SettingsError, match=r"^STARCHAT_MAX_QUEUE \(--max-queue\): must be >= 0, got -1$"):
        ServerSettings.from_sources({}, {"STARCHAT_MAX_QUEUE": "-1"})
    with pytest.raises(SettingsError, match=r"^--max-queue: must be >= 0, got -2$"):  # the flag wins over the variable
        ServerSettings.from_sources({"max_queue": -2}, {"STARCHAT_MAX_QUEUE": "-1"})
    with pytest.raises(SettingsError, match="STARCHAT_PORT"):
        ServerSettings.from_sources({}, {"STARCHAT_PORT": "eighty"})


def test_browser_detection():
    assert prefers_html("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8")
    assert not prefers_html("*/*")
    assert not prefers_html("application/json")
    assert not prefers_html(None)
