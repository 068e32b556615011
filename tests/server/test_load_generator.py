"""`starchat bench serve` (starchat/bench/serve.py) against a real server: every request streamed
and counted, latencies measured, and the server's prefix-cache hits over the run reported (a
repeated --seed repeats the prompts, which a prefix-caching server then finds cached)."""

from __future__ import annotations

import json

from starchat.bench import serve as load_generator


def _run(server, tmp_path, seed: int, name: str) -> dict:
    path = tmp_path / f"{name}.json"
    code = load_generator.main(["--base-url", server.url, "--concurrency", "3", "--num-prompts", "5", "--input-len", "48",
                                "--output-len", "4", "--seed", str(seed), "--json", str(path)])
    assert code == 0
    return json.loads(path.read_text())


def test_load_generator_counts_requests_and_the_prefix_cache_hits(server, tmp_path, capsys):
    first = _run(server, tmp_path, seed=9101, name="first")
    assert first["successful"] == first["requests"] == 5 and first["errors"] == 0
    assert first["output_token_throughput"] > 0 and first["tpot_ms"]["mean"] > 0 and first["ttft_ms"]["p99"] > 0
    # The server counts 48 prompt tokens a request; fresh prompts: none cached.
    assert first["prefix_cache"]["queried_tokens"] == 5 * 48 and first["prefix_cache"]["hit_tokens"] == 0
    repeated = _run(server, tmp_path, seed=9101, name="repeated")
    assert repeated["prefix_cache"]["hit_rate"] > 0.5
    assert "most prompt tokens were already cached" in capsys.readouterr().out
    fresh = _run(server, tmp_path, seed=9102, name="fresh")
    assert fresh["prefix_cache"]["hit_tokens"] == 0


def test_no_prefix_cache_figures_from_servers_without_them():
    import asyncio

    import httpx

    async def counters(status: int, text: str):
        transport = httpx.MockTransport(lambda request: httpx.Response(status, text=text))
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            return await load_generator.prefix_cache_counters(client)

    assert asyncio.run(counters(404, "not found")) is None  # another server
    assert asyncio.run(counters(200, "# TYPE other_total counter\nother_total 3.0\n")) is None
    assert asyncio.run(counters(200, "not prometheus text {")) is None
    text = ("# TYPE starchat_prefix_cache_queries_total counter\nstarchat_prefix_cache_queries_total 96.0\n"
            "# TYPE starchat_prefix_cache_hits_total counter\nstarchat_prefix_cache_hits_total 32.0\n")
    assert asyncio.run(counters(200, text)) == {"queried": 96.0, "hits": 32.0}


def test_lengths_drawn_around_the_given_ones(server, tmp_path):
    # --range-ratio 0.5: each request's lengths uniform over [len / 2, 3 len / 2], as vLLM's random
    # dataset draws them; every request gets exactly the output length it asked for (a request
    # checked against --output-len instead would count as an error).
    path = tmp_path / "mixed.json"
    code = load_generator.main(["--base-url", server.url, "--concurrency", "4", "--num-prompts", "8", "--input-len", "40",
                                "--output-len", "6", "--range-ratio", "0.5", "--seed", "77", "--json", str(path)])
    summary = json.loads(path.read_text())
    assert code == 0 and summary["successful"] == 8 and summary["errors"] == 0
    assert 20 <= summary["input_len_mean"] <= 60 and 3 <= summary["output_len_mean"] <= 9
    assert (summary["input_len_mean"], summary["output_len_mean"]) != (40, 6)


def test_length_drawer_bounds():
    import random

    import pytest

    draw = load_generator.length_drawer(random.Random(0), 0.5)
    drawn = [draw(40) for _ in range(2000)]
    assert min(drawn) == 20 and max(drawn) == 60 and len(set(drawn)) == 41  # every length in the range, both ends
    assert {load_generator.length_drawer(random.Random(0), 0.9)(1) for _ in range(50)} <= {1, 2}  # never below 1
    exact = load_generator.length_drawer(random.Random(0), 0.0)
    assert [exact(40) for _ in range(5)] == [40] * 5
    with pytest.raises(SystemExit):
        load_generator.parse_args(["--range-ratio", "1"])
