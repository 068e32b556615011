"""Load generator for a running `starchat serve`, in the style of `vllm bench serve`.

Sends synthetic prompts (random token ids, so the input length is exact) to the streaming
OpenAI completions API at a fixed concurrency and/or Poisson request rate, then reports
time to first token (TTFT), time per output token (TPOT), inter-token latency (ITL) at
p50/p90/p99, end-to-end latency, request and token throughput, and errors.

    starchat bench serve --base-url http://127.0.0.1:8000 --concurrency 64 --duration 120 \
        --input-len 128 --output-len 128 --json results.json

Every request asks for exactly its output length (`ignore_eos`), as vLLM's random dataset does.
With --range-ratio R each request's input and output lengths are drawn uniformly from
[len * (1 - R), len * (1 + R)] (vLLM's --random-range-ratio): a server's real mix, whose long and
short sequences share its batches, where equal lengths can hide costs that grow with the
longest sequence of a batch.
The prompts follow from --seed, so a repeated run sends the same ones: against a server with
prefix caching they are found cached and their prefill is skipped. The report says how many of
the run's prompt tokens the server found cached (from its /metrics, where it is starchat).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from starchat.bench.lengths import length_drawer

# Token ids drawn for prompts: plain BPE tokens, away from the specials at both ends of StarChat's vocabulary.
_PROMPT_TOKEN_RANGE = (1000, 40000)


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="The server (default: %(default)s).")
    parser.add_argument("--model", default=None, help="Model id to send (default: the first of GET /v1/models).")
    parser.add_argument("--api-key", default=os.environ.get("STARCHAT_API_KEY"), help="Bearer key, if the server needs one.")
    parser.add_argument("--num-prompts", type=int, default=200, help="Requests to send (ignored with --duration).")
    parser.add_argument("--duration", type=float, default=None, help="Keep sending for this many seconds instead.")
    parser.add_argument("--concurrency", type=int, default=64, help="Requests in flight at most (default: %(default)s).")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="Poisson arrival rate in requests/s (default: inf = as fast as concurrency allows).")
    parser.add_argument("--input-len", type=int, default=128, help="Prompt tokens per request (default: %(default)s).")
    parser.add_argument("--output-len", type=int, default=128, help="Generated tokens per request (default: %(default)s).")
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="Draw each request's input and output lengths uniformly from len * (1 -/+ this); "
                             "0 = exactly --input-len / --output-len (default).")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for prompts and arrivals.")
    parser.add_argument("--timeout", type=float, default=600.0, help="Per-request timeout in seconds.")
    parser.add_argument("--warmup", type=int, default=1, help="Requests sent (and not counted) before measuring.")
    parser.add_argument("--json", dest="json_path", default=None, help="Also write the results as JSON here.")
    args = parser.parse_args(argv)
    for name in ("num_prompts", "concurrency", "input_len", "output_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.request_rate <= 0:
        parser.error("--request-rate must be > 0")
    if not 0 <= args.range_ratio < 1:
        parser.error("--range-ratio must be >= 0 and < 1")
    return args


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}


async def send_one(client: httpx.AsyncClient, model: str, prompt: list[int], output_len: int, args) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": args.temperature,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    result = RequestResult(ok=False, prompt_tokens=len(prompt))
    started = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200].decode(errors='replace')}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    result.ok = result.error is None
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {chunk['error'].get('message')}"
                    break
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - started
                    else:
                        result.itl.append(now - last)
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
    result.e2e = time.perf_counter() - started
    if result.ok and result.output_tokens != output_len:
        result.ok, result.error = False, f"got {result.output_tokens} tokens, asked for {output_len}"
    return result


async def run(args) -> dict:
    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout, connect=30)) as client:
        model = args.model or (await client.get("/v1/models")).raise_for_status().json()["data"][0]["id"]
        info = await client.get("/info")  # TGI's route: dtype and device, when the server has it
        server_info = info.json() if info.status_code == 200 else {}

        draw_length = length_drawer(rng, args.range_ratio)

        def request() -> tuple[list[int], int]:
            """A prompt and the output length to ask for."""
            input_len, output_len = draw_length(args.input_len), draw_length(args.output_len)
            return [rng.randrange(*_PROMPT_TOKEN_RANGE) for _ in range(input_len)], output_len

        for _ in range(args.warmup):
            await send_one(client, model, *request(), args)

        cache_before = await prefix_cache_counters(client)
        slots = asyncio.Semaphore(args.concurrency)
        tasks: list[asyncio.Task] = []
        started = time.perf_counter()

        async def limited(request_prompt: list[int], output_len: int) -> RequestResult:
            try:
                return await send_one(client, model, request_prompt, output_len, args)
            finally:
                slots.release()

        while True:
            elapsed = time.perf_counter() - started
            if args.duration is not None and elapsed >= args.duration:
                break
            if args.duration is None and len(tasks) >= args.num_prompts:
                break
            await slots.acquire()
            tasks.append(asyncio.create_task(limited(*request())))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
        cache_after = await prefix_cache_counters(client)
    prefix_cache = None
    if cache_before is not None and cache_after is not None:
        queried, hits = (cache_after[key] - cache_before[key] for key in ("queried", "hits"))
        prefix_cache = {"queried_tokens": queried, "hit_tokens": hits, "hit_rate": hits / queried if queried else 0.0}
    return summarize(args, results, duration, model, server_info, prefix_cache)


_PREFIX_CACHE_COUNTERS = {"starchat_prefix_cache_queries": "queried", "starchat_prefix_cache_hits": "hits"}


async def prefix_cache_counters(client: httpx.AsyncClient) -> dict[str, float] | None:
    """The server's prefix-cache counters (prompt tokens looked up, found) from its Prometheus
    /metrics, or None where it has none (another server, metrics off)."""
    try:
        response = await client.get("/metrics")
        if response.status_code != 200:
            return None
        counters = {}
        for family in text_string_to_metric_families(response.text):
            if family.name in _PREFIX_CACHE_COUNTERS:
                counters[_PREFIX_CACHE_COUNTERS[family.name]] = sum(sample.value for sample in family.samples
                                                                    if sample.name.endswith("_total"))
        return counters if len(counters) == 2 else None
    except (httpx.HTTPError, ValueError):
        return None


def _percentiles(values: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    array = np.asarray(values) * scale
    return {"mean": float(array.mean()), "p50": float(np.percentile(array, 50)),
            "p90": float(np.percentile(array, 90)), "p99": float(np.percentile(array, 99))}


def summarize(args, results: list[RequestResult], duration: float, model: str, server_info: dict,
              prefix_cache: dict | None = None) -> dict:
    good = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    output_tokens = sum(r.output_tokens for r in good)
    return {
        "machine": machine(),
        "server": {"base_url": args.base_url, "model": model, "dtype": server_info.get("model_dtype"),
                   "device": server_info.get("model_device_type")},
        "settings": {key: (None if isinstance(value, float) and math.isinf(value) else value)  # JSON has no inf
                     for key, value in vars(args).items() if key not in ("api_key", "json_path")},
        "duration_s": duration,
        "requests": len(results),
        "successful": len(good),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "input_len_mean": float(np.mean([r.prompt_tokens for r in good])) if good else None,
        "output_len_mean": float(np.mean([r.output_tokens for r in good])) if good else None,
        "request_throughput": len(good) / duration,
        "output_token_throughput": output_tokens / duration,
        "total_token_throughput": (output_tokens + sum(r.prompt_tokens for r in good)) / duration,
        "ttft_ms": _percentiles([r.ttft for r in good if r.ttft is not None]),
        "tpot_ms": _percentiles([r.tpot for r in good if r.tpot is not None]),
        "itl_ms": _percentiles([gap for r in good for gap in r.itl]),
        "e2e_ms": _percentiles([r.e2e for r in good]),
        "prefix_cache": prefix_cache,  # the server's own count over the run, where it reports one
    }


def print_report(summary: dict) -> None:
    m, s = summary["machine"], summary["settings"]
    print(f"machine: {m['platform']}, {m['cpu_count']} CPUs ({m['processor']}), Python {m['python']}")
    print(f"server:  {summary['server']['base_url']}  model={summary['server']['model']}  "
          f"dtype={summary['server']['dtype']}  device={summary['server']['device']}")
    rate = "inf" if s["request_rate"] is None else s["request_rate"]
    spread = f" +/-{s['range_ratio']:.0%}" if s.get("range_ratio") else ""
    print(f"load:    concurrency={s['concurrency']}  rate={rate}/s  input={s['input_len']}{spread}  "
          f"output={s['output_len']}{spread}  " + (f"duration={s['duration']}s" if s["duration"] else f"prompts={s['num_prompts']}"))
    print("=" * 60)
    print(f"{'Successful requests:':<36}{summary['successful']:>12}")
    print(f"{'Errors:':<36}{summary['errors']:>12}")
    for example in summary["error_examples"]:
        print(f"  {example}")
    print(f"{'Benchmark duration (s):':<36}{summary['duration_s']:>12.2f}")
    print(f"{'Request throughput (req/s):':<36}{summary['request_throughput']:>12.2f}")
    print(f"{'Output token throughput (tok/s):':<36}{summary['output_token_throughput']:>12.2f}")
    print(f"{'Total token throughput (tok/s):':<36}{summary['total_token_throughput']:>12.2f}")
    for name, label in (("ttft_ms", "Time to first token"), ("tpot_ms", "Time per output token"),
                        ("itl_ms", "Inter-token latency"), ("e2e_ms", "End-to-end latency")):
        values = summary[name]
        print(f"{'-' * 17}{label:^26}{'-' * 17}")
        for key in ("mean", "p50", "p90", "p99"):
            value = values[key]
            print(f"{(key.upper() if key != 'mean' else 'Mean') + ' (ms):':<36}{'-' if value is None else f'{value:.2f}':>12}")
    cache = summary.get("prefix_cache")
    if cache is not None:
        print(f"{'-' * 17}{'Prefix cache (server)':^26}{'-' * 17}")
        print(f"{'Prompt tokens found cached:':<36}{cache['hit_tokens']:>12.0f}")
        print(f"{'Of prompt tokens looked up:':<36}{cache['queried_tokens']:>12.0f}")
        print(f"{'Hit rate:':<36}{100 * cache['hit_rate']:>11.1f}%")
        if cache["hit_rate"] > 0.5:
            print("note: most prompt tokens were already cached (a repeated --seed?): their prefill was skipped. "
                  "Use another --seed, or a server started with --no-prefix-caching, to measure it.")
    print("=" * 60)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = asyncio.run(run(args))
    except httpx.HTTPError as error:
        print(f"error: cannot reach {args.base_url}: {error}", file=sys.stderr)
        return 2
    print_report(summary)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as out:
            json.dump(summary, out, indent=2)
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
