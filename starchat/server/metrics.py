"""Prometheus metrics of one app, in its own registry (two apps in one process never share counts).

Engine gauges (running, waiting, KV-cache use) are read from the engine at scrape time, so
they are never stale; latencies and token counts are recorded as requests stream.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine_stats: Callable[[], object | None], in_flight: Callable[[], int]):
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.http_requests = Counter("starchat_http_requests", "HTTP requests by route, method and status.",
                                     ["route", "method", "status"], registry=registry)
        self.http_duration = Histogram("starchat_http_request_duration_seconds",
                                       "Time from request to the end of the response, by route.", ["route"],
                                       buckets=_LATENCY_BUCKETS, registry=registry)
        self.e2e_latency = Histogram("starchat_e2e_request_latency_seconds",
                                     "Time from a generation's arrival to its last token.",
                                     buckets=_LATENCY_BUCKETS, registry=registry)
        self.time_to_first_token = Histogram("starchat_time_to_first_token_seconds",
                                             "Time from a generation's arrival to its first token.",
                                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram("starchat_inter_token_latency_seconds",
                                             "Time between two tokens of one generation.",
                                             buckets=_TOKEN_LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("starchat_prompt_tokens", "Prompt tokens of the generations served.",
                                     registry=registry)
        self.generation_tokens = Counter("starchat_generation_tokens", "Tokens generated.", registry=registry)
        self.finished = Counter("starchat_generations_finished", "Generations by finish reason "
                                "(stop, length, abort, timeout, error).", ["finish_reason"], registry=registry)
        self.rejected = Counter("starchat_requests_rejected", "Generation requests turned away, by reason.",
                                ["reason"], registry=registry)
        registry.register(_EngineCollector(engine_stats, in_flight))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, engine_stats: Callable[[], object | None], in_flight: Callable[[], int]):
        self._engine_stats = engine_stats
        self._in_flight = in_flight

    def describe(self):
        return []  # names are only known at collect time; nothing to check at registration

    def collect(self):
        stats = self._engine_stats()
        loaded = stats is not None
        yield _gauge("starchat_model_loaded", "1 when the model is loaded and the engine loop runs.", 1 if loaded else 0)
        yield _gauge("starchat_requests_in_flight", "Generation requests admitted (running or queued).", self._in_flight())
        if not loaded:
            return
        yield _gauge("starchat_num_requests_running", "Sequences in the engine's running batch.", stats.num_running)
        yield _gauge("starchat_num_requests_waiting", "Sequences queued in the engine (queue depth).", stats.num_waiting)
        yield _gauge("starchat_kv_cache_usage_ratio", "Share of KV-cache blocks in use (0..1).", stats.kv_cache_usage)
        yield _gauge("starchat_kv_cache_used_blocks", "KV-cache blocks in use.", stats.kv_cache_used_blocks)
        yield _gauge("starchat_kv_cache_total_blocks", "KV-cache blocks in all.", stats.kv_cache_total_blocks)
        yield _counter("starchat_num_preemptions", "Sequences preempted for lack of cache.", stats.num_preemptions)
        yield _counter("starchat_prefix_cache_queries", "Tokens of admitted requests (prompts; and outputs, for "
                       "preempted ones) looked up in the prefix cache.", stats.prefix_cache_queries)
        yield _counter("starchat_prefix_cache_hits", "Of those, tokens found in the prefix cache (their keys and "
                       "values reused, not computed).", stats.prefix_cache_hits)
        yield _counter("starchat_spec_decode_num_draft_tokens", "Speculative decoding: tokens drafted and verified.",
                       stats.spec_decode_draft_tokens)
        yield _counter("starchat_spec_decode_num_accepted_tokens", "Speculative decoding: drafted tokens accepted.",
                       stats.spec_decode_accepted_tokens)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    counter = CounterMetricFamily(name, documentation)
    counter.add_metric([], value)
    return counter


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation)
    gauge.add_metric([], value)
    return gauge
