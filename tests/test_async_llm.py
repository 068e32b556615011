"""The streaming engine API the server builds on."""

from __future__ import annotations

import asyncio
import time

import pytest

from starchat import LLM, SamplingParams, SamplingParamsError
from starchat.config import EngineConfig
from starchat.engine.async_llm import AsyncLLM


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = AsyncLLM(EngineConfig(model=str(tiny_model_dir), dtype="float32"), progress=False)
    yield engine
    engine.shutdown()


async def leave_after(engine, prompt: str, tokens: int) -> None:
    """Stream a long generation and leave the loop once `tokens` tokens have come."""
    stream = engine.generate(prompt, SamplingParams(max_new_tokens=500, ignore_eos=True))
    async for delta in stream:
        if delta.num_generated_tokens >= tokens:
            break
    await stream.aclose()


async def wait_until_freed(engine):
    for _ in range(200):  # the engine thread frees it before its next step
        stats = engine.stats()
        if stats.num_running == 0 and stats.kv_cache_used_blocks == 0:
            break
        await asyncio.sleep(0.01)
    return engine.stats()


async def collect(engine, prompt, params, request_id=None):
    deltas = []
    async for delta in engine.generate(prompt, params, request_id=request_id):
        deltas.append(delta)
    return deltas


def test_concurrent_streams_equal_offline_results(engine, tiny_model_dir):
    prompts = ["def f():", "class A:", "import sys\n" * 5]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True, do_sample=True, temperature=0.8, seed=11)
    expected = LLM(str(tiny_model_dir), dtype="float32", progress=False).generate(prompts, params)

    async def main():
        return await asyncio.gather(*(collect(engine, p, params) for p in prompts))

    for deltas, completion in zip(asyncio.run(main()), expected):
        assert "".join(d.text for d in deltas) == completion.text
        assert [t for d in deltas for t in d.token_ids] == completion.token_ids
        assert deltas[-1].finished and deltas[-1].finish_reason == "length" and deltas[-1].seed == 11


def test_leaving_the_loop_cancels_and_frees_the_cache(engine):
    async def main():
        await leave_after(engine, "def f():", 3)
        return await wait_until_freed(engine)

    stats = asyncio.run(main())
    assert stats.num_running == 0 and stats.kv_cache_used_blocks == 0


def test_bad_request_raises_before_streaming(engine):
    async def main():
        await collect(engine, "x", SamplingParams(top_p=2.0))

    with pytest.raises(SamplingParamsError) as error:
        asyncio.run(main())
    assert error.value.field == "top_p"
    assert engine.is_alive()


def test_streamed_text_equals_the_whole_decode(engine):
    """No stray U+FFFD from characters split across tokens: the pieces join to the full decode.

    (The detokenizer itself is tested token by token on emoji, CJK and accents in test_tokenizer.py.)
    """
    text = "naïve café 日本語 😀 " * 3

    async def main():
        return await collect(engine, text, SamplingParams(max_new_tokens=40, ignore_eos=True, do_sample=True, seed=5,
                                                          temperature=1.5))

    deltas = asyncio.run(main())
    token_ids = [t for d in deltas for t in d.token_ids]
    assert "".join(d.text for d in deltas) == engine.tokenizer.decode(token_ids)


def test_speculative_streams_with_a_cancellation(tiny_model_dir):
    """Through the streaming API with speculative decoding: several tokens can come out of one
    engine step; each still arrives as its own delta, a stream left early frees its blocks, and
    the others get the plain engine's tokens."""
    prompts = ["x = [1, 2, 3, 1, 2, 3, 1, 2,", "import os\nimport sys\nimport", "def f():\n    pass\n\ndef f():"]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    expected = LLM(str(tiny_model_dir), dtype="float32", progress=False).generate(prompts, params)
    engine = AsyncLLM(EngineConfig(model=str(tiny_model_dir), dtype="float32", num_speculative_tokens=4),
                      progress=False)

    async def main():
        return await asyncio.gather(leave_after(engine, "while True:\n    while True:\n", 5),
                                    *(collect(engine, p, params) for p in prompts))

    try:
        _, *results = asyncio.run(main())
        for deltas, completion in zip(results, expected):
            assert [t for d in deltas for t in d.token_ids] == completion.token_ids
            assert all(len(d.token_ids) == 1 for d in deltas) and [d.finished for d in deltas].count(True) == 1
        assert engine.stats().spec_decode_accepted_tokens > 0
        assert asyncio.run(wait_until_freed(engine)).kv_cache_used_blocks == 0
    finally:
        engine.shutdown()


def test_the_engine_is_built_and_stepped_in_its_own_thread(tiny_model_dir, monkeypatch):
    # One thread for both keeps one team of OpenMP threads on a CPU (engine_thread.py).
    import threading

    from starchat.engine import async_llm, engine_thread

    built_in, stepped_in = [], []
    real_engine = async_llm.LLMEngine

    class RecordingEngine(real_engine):
        def __init__(self, *args, **kwargs):
            built_in.append(threading.current_thread())
            super().__init__(*args, **kwargs)

        def step(self):
            stepped_in.append(threading.current_thread())
            return super().step()

    monkeypatch.setattr(async_llm, "LLMEngine", RecordingEngine)
    engine = AsyncLLM(EngineConfig(model=str(tiny_model_dir), dtype="float32"), progress=False)
    try:
        deltas = asyncio.run(collect(engine, "def f(", SamplingParams(max_new_tokens=3, ignore_eos=True)))
        assert sum(len(d.token_ids) for d in deltas) == 3 and deltas[-1].finished
        assert built_in == [engine._thread] and set(stepped_in) == {engine._thread}
        assert engine._thread is not threading.current_thread() and engine._thread.name == "starchat-engine"
    finally:
        engine.shutdown()

    # What building raises reaches the caller; the thread ends.
    running_before = {t for t in threading.enumerate() if t.name == "starchat-engine"}

    def failing_build():
        raise FileNotFoundError("no such model")

    with pytest.raises(FileNotFoundError, match="no such model"):
        engine_thread.start_engine_thread(failing_build, lambda engine: None)
    from starchat.model.loader import CheckpointError

    with pytest.raises(CheckpointError, match="no such folder"):
        AsyncLLM(EngineConfig(model=str(tiny_model_dir / "missing"), dtype="float32"), progress=False)
    for _ in range(500):
        left = {t for t in threading.enumerate() if t.name == "starchat-engine"} - running_before
        if not left:
            break
        time.sleep(0.01)
    assert not left
