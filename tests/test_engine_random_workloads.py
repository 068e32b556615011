"""Random workloads through one engine: every greedy request gets the tokens it gets alone.

Each case draws an engine configuration (step budget, batch size, block size, a KV cache small
enough to preempt, prefix caching, n-gram drafts), prompts sharing prefixes or not, arrival steps
and cancellations; the reference is each request run alone in an engine with none of that. A
cancelled request's tokens must be a prefix of its reference. Afterwards every cache block is free.
(Run with more seeds by hand: STARCHAT_RANDOM_WORKLOADS=200.)
"""

from __future__ import annotations

import os
import random

import pytest

from starchat import SamplingParams
from starchat.config import EngineConfig
from starchat.engine.engine import LLMEngine

CASES = int(os.environ.get("STARCHAT_RANDOM_WORKLOADS", "12"))


@pytest.fixture(scope="module")
def alone(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", enable_prefix_caching=False), progress=False)
    results: dict[tuple, list[int]] = {}

    def tokens(prompt_ids: list[int], params: SamplingParams) -> list[int]:
        key = (tuple(prompt_ids), repr(params))
        if key not in results:
            out, _ = run(engine, {0: [("alone", prompt_ids, params)]}, {})
            results[key] = out["alone"]
        return results[key]
    return tokens


def run(engine: LLMEngine, arrivals: dict, cancels: dict) -> tuple[dict[str, list[int]], int]:
    tokens: dict[str, list[int]] = {}
    step = 0
    pending = dict(arrivals)
    while pending or engine.has_unfinished_requests():
        for request_id, prompt_ids, params in pending.pop(step, []):
            engine.add_request(list(prompt_ids), params, request_id=request_id)
            tokens[request_id] = []
        for request_id in cancels.get(step, []):
            engine.abort_request(request_id)
        if engine.has_unfinished_requests():
            for delta in engine.step():
                tokens[delta.request_id].extend(delta.token_ids)
        step += 1
        assert step < 5000, "no progress"
    return tokens, step


@pytest.mark.parametrize("case", range(CASES))
def test_random_workload_gives_each_request_its_tokens_alone(tiny_model_dir, alone, case):
    rng = random.Random(case)
    settings = dict(max_num_batched_tokens=rng.choice([8, 16, 33, 64, 512]), max_num_seqs=rng.choice([1, 2, 3, 8, 32]),
                    enable_prefix_caching=rng.random() < 0.7, kv_block_size=rng.choice([16, 32]),
                    num_speculative_tokens=rng.choice([0, 0, 3]))
    cache_tokens = rng.choice([None, 160, 256, 400])
    pressure = case % 3 == 0  # every third case: many short prompts that outgrow a small cache (preemptions)
    if pressure:
        cache_tokens, settings["max_num_seqs"] = 160, 8
    if cache_tokens:  # the tiny checkpoint: 2 layers x (key, value) x 16 float32 values a token
        settings["kv_cache_memory_bytes"] = cache_tokens * 2 * 2 * 16 * 4
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", **settings), progress=False)
    prefixes = [[rng.randrange(100, 49000) for _ in range(rng.randint(1, 120))] for _ in range(3)]
    arrivals: dict[int, list] = {}
    requests = {}
    for i in range(rng.randint(2, 12)):
        shared = rng.choice(prefixes) if rng.random() < 0.6 else []
        prompt_ids = shared + [rng.randrange(100, 49000) for _ in range(rng.randint(0 if shared else 1, 150))]
        prompt_ids = prompt_ids[:30 if pressure else engine.max_model_len - 45]
        params = SamplingParams(max_new_tokens=rng.randint(20, 40) if pressure else rng.randint(1, 40),
                                ignore_eos=pressure or rng.random() < 0.8,
                                repetition_penalty=rng.choice([1.0, 1.0, 1.3]))
        requests[f"r{i}"] = (prompt_ids, params)
        arrivals.setdefault(rng.randint(0, 3 if pressure else 20), []).append((f"r{i}", prompt_ids, params))
    cancels: dict[int, list[str]] = {}
    for request_id in requests:
        if rng.random() < 0.15:
            cancels.setdefault(rng.randint(0, 40), []).append(request_id)
    cancelled = {request_id for ids in cancels.values() for request_id in ids}

    tokens, _ = run(engine, arrivals, cancels)
    for request_id, (prompt_ids, params) in requests.items():
        expected = alone(prompt_ids, params)
        if request_id in cancelled:
            assert tokens[request_id] == expected[:len(tokens[request_id])], (request_id, settings)
        else:
            assert tokens[request_id] == expected, (request_id, settings)
    allocator = engine.scheduler.allocator
    assert allocator.num_free_blocks == allocator.num_blocks, settings
