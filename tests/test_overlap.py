"""Host work overlapped with the device (`overlap_host_work`, on by default on a GPU): a step's
tokens are turned into text while the next step runs, so deltas come out one step() later. The
outputs must be exactly those of the engine that hands them out at once, whatever the request
asks for (stop strings, stop tokens, logprobs, sampling, lengths), and cancelling or a failing
step must lose nothing that was made. Run on the CPU with the option forced on.
"""

from __future__ import annotations

import pytest

from starchat import LLM, SamplingParams

PROMPTS = ["def quicksort(items):", "class Stack:\n    def push(self, item):", "x = [", "SELECT name FROM users WHERE",
           "# " + "a long comment that makes a long prompt " * 12]


def mixed_params(llm: LLM) -> list[SamplingParams]:
    reference = llm.generate(PROMPTS[:2], SamplingParams(max_new_tokens=12, ignore_eos=True))
    stop_text = reference[0].text[3:6]  # a stop string the first prompt is sure to meet mid-text
    stop_token = reference[1].token_ids[5]  # and a stop token the second one meets
    return [
        SamplingParams(max_new_tokens=12, stop=[stop_text], ignore_eos=True),
        SamplingParams(max_new_tokens=12, stop_token_ids=[stop_token], ignore_eos=True),
        SamplingParams(max_new_tokens=9, logprobs=3, ignore_eos=True),
        SamplingParams(max_new_tokens=15, do_sample=True, temperature=0.9, top_p=0.9, seed=4, ignore_eos=True),
        SamplingParams(max_new_tokens=7, min_new_tokens=3, repetition_penalty=1.3),
    ]


def summary(completions) -> list[tuple]:
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason,
             [(lp.token_id, round(lp.logprob, 5)) for lp in (c.logprobs or [])]) for c in completions]


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    at_once = LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False, max_num_seqs=3)
    overlapped = LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False, max_num_seqs=3,
                     overlap_host_work=True)
    assert not at_once.engine.overlap_host_work and overlapped.engine.overlap_host_work
    return at_once, overlapped


def test_overlapped_engine_gives_the_same_completions(engines):
    at_once, overlapped = engines
    params = mixed_params(at_once)
    expected = summary(at_once.generate(PROMPTS, params))  # 5 requests over 3 slots: joins mid-run
    assert summary(overlapped.generate(PROMPTS, params)) == expected
    finish_reasons = {row[2] for row in expected}
    assert {"stop", "length"} <= finish_reasons and expected[0][3] is not None


def test_deltas_lag_one_step_and_stream_in_order(engines):
    _, overlapped = engines
    engine = overlapped.engine
    request_id = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=5, ignore_eos=True))
    per_step = []
    while engine.has_unfinished_requests():
        per_step.append(engine.step())
    assert per_step[0] == []  # the prompt's token is detokenized while the next step runs
    deltas = [d for step in per_step for d in step]
    assert [len(d.token_ids) for d in deltas] == [1] * 5 and all(d.request_id == request_id for d in deltas)
    assert [d.num_generated_tokens for d in deltas] == [1, 2, 3, 4, 5]
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert per_step[-1] == [deltas[-1]] and not engine.request_ids()  # the last step only hands out


def test_cancelling_with_a_token_pending_sends_no_more_deltas(engines):
    _, overlapped = engines
    engine = overlapped.engine
    keep = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=6, ignore_eos=True))
    cancel = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=6, ignore_eos=True))
    engine.step()
    engine.step()  # both have a token recorded and not yet turned into a delta
    abort = engine.abort_request(cancel)
    assert abort.finished and abort.finish_reason == "abort"
    later = []
    while engine.has_unfinished_requests():
        later.extend(engine.step())
    assert {d.request_id for d in later} == {keep} and later[-1].finished
    assert engine.stats().kv_cache_used_blocks == 0


def test_a_failing_step_hands_out_what_it_made_next_time(engines, monkeypatch):
    _, overlapped = engines
    engine = overlapped.engine
    finishing = engine.add_request(PROMPTS[3], SamplingParams(max_new_tokens=1, ignore_eos=True))
    running = engine.add_request(PROMPTS[4], SamplingParams(max_new_tokens=4, ignore_eos=True))
    engine.step()  # both prompts: one token each recorded, and `finishing` is done
    real_launch = engine.runner.launch

    class Failing:
        def result(self):
            raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "launch", lambda batch: (real_launch(batch), Failing())[1])
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()  # made both first-token deltas before the failure
    monkeypatch.setattr(engine.runner, "launch", real_launch)
    assert engine.request_ids() == [running]  # `finishing` has left; its last delta waits
    for request_id in engine.request_ids():  # what the servers do after a failed step
        assert engine.abort_request(request_id).finish_reason == "abort"
    handed_out = []
    while engine.has_unfinished_requests():
        handed_out.extend(engine.step())
    # the finished request's delta is not lost; the cancelled one gets nothing after its abort
    assert [(d.request_id, d.finished, d.finish_reason) for d in handed_out] == [(finishing, True, "length")]
