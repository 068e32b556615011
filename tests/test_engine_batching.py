"""Continuous batching gives each request exactly what it would get alone."""

from __future__ import annotations

import pytest
import torch

from starchat import LLM, SamplingParams
from starchat.config import EngineConfig
from starchat.engine.engine import LLMEngine

PROMPTS = [
    "def quicksort(items):",
    "class Stack:\n    def push(self, item):",
    "# " + "a long comment that makes a long prompt " * 30,
    "SELECT name FROM users WHERE",
    "<|user|>\nWrite hello world in Rust<|end|>\n<|assistant|>",
    "x = [",
]
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", progress=False)
    return {prompt: llm.generate([prompt], GREEDY)[0].token_ids for prompt in PROMPTS}


def run_until_done(engine: LLMEngine, on_step=None) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    finish: dict[str, str] = {}
    step = 0
    while engine.has_unfinished_requests():
        for delta in engine.step():
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
            if delta.finished:
                finish[delta.request_id] = delta.finish_reason
        step += 1
        if on_step:
            on_step(step)
    return tokens


def test_batched_equals_alone_with_small_chunks(tiny_model_dir, alone):
    # A 16-token budget forces the long prompt through several chunks while others decode.
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", max_num_batched_tokens=16,
                                    max_num_seqs=8), progress=False)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(prompt, GREEDY, request_id=str(i))
    tokens = run_until_done(engine)
    for i, prompt in enumerate(PROMPTS):
        assert tokens[str(i)] == alone[prompt], prompt


def test_requests_joining_mid_way_and_cancelled(tiny_model_dir, alone):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", max_num_batched_tokens=64), progress=False)
    engine.add_request(PROMPTS[0], GREEDY, request_id="first")
    engine.add_request(PROMPTS[1], GREEDY, request_id="cancelled")
    blocks_before_cancel = []

    def on_step(step):
        if step == 3:
            engine.add_request(PROMPTS[2], GREEDY, request_id="joins-at-3")
        if step == 5:
            blocks_before_cancel.append(engine.stats().kv_cache_used_blocks)
            final = engine.abort_request("cancelled")
            assert final.finished and final.finish_reason == "abort"
            # Its blocks are back in the pool at once.
            assert engine.stats().kv_cache_used_blocks < blocks_before_cancel[0]
        if step == 9:
            engine.add_request(PROMPTS[3], GREEDY, request_id="joins-at-9")

    tokens = run_until_done(engine, on_step)
    assert tokens["first"] == alone[PROMPTS[0]]
    assert tokens["joins-at-3"] == alone[PROMPTS[2]]
    assert tokens["joins-at-9"] == alone[PROMPTS[3]]
    assert tokens["cancelled"] == alone[PROMPTS[1]][: len(tokens["cancelled"])]
    assert engine.stats().kv_cache_used_blocks == 0


def test_full_cache_preempts_and_recomputes_without_changing_tokens(tiny_model_dir, alone):
    # 26 blocks of 16 tokens: not enough for all six requests at once, enough for each alone.
    per_token = 2 * 2 * 16 * 4  # layers * (k, v) * kv_dim (one head of 16) * float32
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", kv_cache_memory_bytes=per_token * 16 * 26,
                                    max_num_batched_tokens=64), progress=False)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(prompt, GREEDY, request_id=str(i))
    tokens = run_until_done(engine)
    assert engine.stats().num_preemptions > 0
    for i, prompt in enumerate(PROMPTS):
        assert tokens[str(i)] == alone[prompt], prompt


def test_request_larger_than_the_cache_is_refused_not_crashed(tiny_model_dir):
    per_token = 2 * 2 * 16 * 4
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", kv_cache_memory_bytes=per_token * 64),
                       progress=False)
    assert engine.max_model_len == 64
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("word " * 100, GREEDY)


def test_step_token_budget_defaults_by_device(tiny_model_dir):
    from starchat.engine.devices import default_batched_tokens

    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", device="cpu"), progress=False)
    assert engine.scheduler.max_num_batched_tokens == default_batched_tokens(torch.device("cpu")) == 512
    # a GPU computes a 2,048-token prompt in one step
    assert default_batched_tokens(torch.device("cuda")) == 2048


def test_gpu_cache_budget_keeps_the_measured_step_free(monkeypatch):
    """The KV-cache budget on a GPU: 85% of free memory less the step's own measured memory (plus
    a margin for CUDA-graph pools and sampling), 1 GiB where it was not measured, never less than
    one full context."""
    from starchat.engine import devices

    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * gib, 80 * gib))
    cuda = torch.device("cuda")
    per_token, context, seqs = 1 << 20, 1000, 100  # all sequences at full context would take 100,000 MiB
    assert devices.default_kv_cache_bytes(cuda, per_token, context, seqs) == int(20 * gib * 0.85) - gib
    measured = devices.default_kv_cache_bytes(cuda, per_token, context, seqs, step_bytes=3 * gib)
    assert measured == int(20 * gib * 0.85) - 3 * gib - devices.GRAPHS_AND_SAMPLER_RESERVE
    assert devices.default_kv_cache_bytes(cuda, per_token, context, seqs, step_bytes=40 * gib) == per_token * context
    # small contexts: every sequence at full context, whatever the step needs
    assert devices.default_kv_cache_bytes(cuda, per_token, 10, 4, step_bytes=3 * gib) == per_token * 10 * 4
    # only GPU steps are measured
    assert devices.profile_step_bytes(torch.nn.Linear(2, 2), 2048, 64, torch.float32, torch.device("cpu")) is None


def test_the_dummy_step_that_gpu_memory_is_measured_on_runs(tiny_model_dir):
    from starchat.engine import devices

    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", device="cpu"), progress=False)
    model, config = engine.runner.model, engine.model_config
    cache_bytes = devices.run_dummy_step(model, 100, 8, torch.float32, torch.device("cpu"))
    assert cache_bytes == config.n_layer * 2 * 100 * config.kv_dim * 4


def test_cpu_cache_budget_leaves_the_mapped_weights_their_memory(tmp_path):
    """On a CPU the KV cache takes a share of MemAvailable less the file pages the process maps:
    Linux counts a mapped model's pages (a `starchat quantize` folder) as available page cache."""
    from starchat.engine import devices

    meminfo, status = tmp_path / "meminfo", tmp_path / "status"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    status.write_text("Name:\tpython\nVmRSS:\t16500000 kB\nRssAnon:\t  500000 kB\nRssFile:\t16000000 kB\n")
    assert devices._available_host_memory(str(meminfo), str(status)) == 4000000 * 1024
    status.write_text("Name:\tpython\n")  # no RssFile line: MemAvailable as it is
    assert devices._available_host_memory(str(meminfo), str(status)) == 20000000 * 1024
    status.write_text("RssFile:\t30000000 kB\n")
    assert devices._available_host_memory(str(meminfo), str(status)) == 0
    # the real files give a figure no larger than MemAvailable
    assert 0 < devices._available_host_memory() <= devices._meminfo_kib("/proc/meminfo", "MemAvailable:") * 1024
