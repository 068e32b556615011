"""Speculative decoding with n-gram drafts: fewer steps, exactly the tokens of greedy decoding
(HF transformers' `generate` is the reference), stop conditions honoured inside a verified run."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTBigCodeForCausalLM as HFModel

from reference_checkpoints import hf_greedy
from starchat import SamplingParams
from starchat.config import EngineConfig
from starchat.engine.engine import LLMEngine
from starchat.engine.speculative import accepted_tokens, propose_drafts

PROMPTS = ["def add(a, b):\n    return a + b\n\ndef add(a, b):", "x = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2,",
           "import os\nimport sys\nimport"]
GREEDY = SamplingParams(max_new_tokens=40, ignore_eos=True)


def test_drafts_follow_the_latest_occurrence_of_the_longest_suffix():
    assert propose_drafts([1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]  # "1 2 3" seen before
    assert propose_drafts([7, 2, 3, 9, 5, 2, 3], 2) == [9, 5]  # "2 3" seen, "5 2 3" not
    assert propose_drafts([4, 1, 8, 1, 6, 1], 1, min_ngram=1) == [6]  # the latest "1" before the suffix
    assert propose_drafts([4, 1, 8, 1, 6, 1], 1) == []  # one token is not enough by default
    assert propose_drafts([1, 2, 1, 2, 1, 2], 4) == [1, 2]  # cut by the sequence's end
    assert propose_drafts([5, 6, 7], 3) == [] and propose_drafts([5], 3) == [] and propose_drafts([1, 2, 1, 2], 0) == []


def test_accepted_tokens_are_the_agreeing_drafts_and_the_models_next():
    assert accepted_tokens([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]
    assert accepted_tokens([4, 5, 6], [4, 9, 6, 7]) == [4, 9]  # a later match does not count
    assert accepted_tokens([4, 5, 6], [8, 5, 6, 7]) == [8]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return HFModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def make_engine(model_dir, **options) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", **options), progress=False)


def run(engine: LLMEngine, prompts: list, params) -> tuple[list[list], int]:
    """Every request's deltas, and the number of steps taken."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(prompt, p) for prompt, p in zip(prompts, params)]
    deltas = {request_id: [] for request_id in ids}
    steps = 0
    while engine.has_unfinished_requests():
        for delta in engine.step():
            deltas[delta.request_id].append(delta)
        steps += 1
    return [deltas[request_id] for request_id in ids], steps


def tokens(deltas) -> list[int]:
    return [t for delta in deltas for t in delta.token_ids]


def test_speculative_greedy_equals_hf_in_fewer_steps(tiny_model_dir, reference):
    engine = make_engine(tiny_model_dir, num_speculative_tokens=5)
    prompt_ids = [engine.tokenizer.encode(prompt) for prompt in PROMPTS]
    out, steps = run(engine, prompt_ids, GREEDY)
    for ids, deltas in zip(prompt_ids, out):
        assert tokens(deltas) == hf_greedy(reference, ids, GREEDY.max_new_tokens)
        # One token per delta, the finish reason with the last only; the text adds up.
        assert all(len(delta.token_ids) == 1 for delta in deltas)
        assert [delta.finished for delta in deltas] == [False] * (len(deltas) - 1) + [True]
        assert deltas[-1].finish_reason == "length" and deltas[-2].finish_reason is None
        assert "".join(delta.text for delta in deltas) == engine.tokenizer.decode(tokens(deltas))
    stats = engine.stats()
    assert stats.spec_decode_accepted_tokens > 0 and stats.spec_decode_draft_tokens >= stats.spec_decode_accepted_tokens
    assert steps < GREEDY.max_new_tokens  # a step without speculation yields one token per request
    assert stats.kv_cache_used_blocks == 0


def test_stop_conditions_inside_a_verified_run(tiny_model_dir):
    """A stop token, a stop string or max_new_tokens reached in the middle of the tokens a step
    accepts ends the request right there, as without speculation."""
    speculative = make_engine(tiny_model_dir, num_speculative_tokens=5)
    plain = make_engine(tiny_model_dir)
    prompt = speculative.tokenizer.encode(PROMPTS[1])
    looped = tokens(run(plain, [prompt], GREEDY)[0][0])
    text = speculative.tokenizer.decode(looped)
    cases = [SamplingParams(max_new_tokens=13, ignore_eos=True),
             SamplingParams(max_new_tokens=40, stop_token_ids=[looped[9]]),
             SamplingParams(max_new_tokens=40, stop=[text[len(text) // 2:len(text) // 2 + 3]]),
             SamplingParams(max_new_tokens=40, ignore_eos=True, stop=["never appears"], min_new_tokens=3)]
    for params in cases:
        (ours,), _ = run(speculative, [prompt], params)
        (expected,), _ = run(plain, [prompt], params)
        assert tokens(ours) == tokens(expected)
        assert "".join(d.text for d in ours) == "".join(d.text for d in expected)
        assert (ours[-1].finish_reason, ours[-1].stop_reason) == (expected[-1].finish_reason, expected[-1].stop_reason)
    assert speculative.stats().spec_decode_accepted_tokens > 0


def test_other_requests_are_not_changed_and_a_full_batch_does_not_speculate(tiny_model_dir):
    speculative = make_engine(tiny_model_dir, num_speculative_tokens=4, speculative_max_running=3)
    plain = make_engine(tiny_model_dir)
    prompts = [speculative.tokenizer.encode(prompt) for prompt in PROMPTS]
    params = [GREEDY, SamplingParams(max_new_tokens=40, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True, do_sample=True),
              SamplingParams(max_new_tokens=40, ignore_eos=True, logprobs=2)]
    ours, _ = run(speculative, prompts, params)
    expected, _ = run(plain, prompts, params)
    assert [tokens(d) for d in ours] == [tokens(d) for d in expected]
    assert [lp.logprob for d in ours[2] for lp in d.logprobs] == pytest.approx(
        [lp.logprob for d in expected[2] for lp in d.logprobs], abs=1e-4)
    drafted = speculative.stats().spec_decode_draft_tokens
    assert drafted > 0  # the greedy one speculated
    run(speculative, prompts + prompts[:1], [GREEDY] * 4)  # 4 running > 3: no speculation
    assert speculative.stats().spec_decode_draft_tokens == drafted


def test_with_prefix_caching_only_verified_tokens_are_shared(tiny_model_dir, reference):
    """Drafts are written into the cache before they are verified: the blocks a later request
    reuses must hold only accepted tokens."""
    engine = make_engine(tiny_model_dir, num_speculative_tokens=5)
    first = engine.tokenizer.encode(PROMPTS[0])
    (deltas,), _ = run(engine, [first], GREEDY)
    follow_up = first + tokens(deltas)[:30] + engine.tokenizer.encode("\n\n# and then")
    (again,), _ = run(engine, [follow_up], SamplingParams(max_new_tokens=20, ignore_eos=True))
    assert again[-1].num_cached_tokens >= 32
    assert tokens(again) == hf_greedy(reference, follow_up, 20)


@pytest.mark.parametrize("verify_in", ["native decode step", "module path"])
def test_rejected_drafts_leave_no_trace_on_a_trained_model(verify_in):
    """starchat-nano writes real code, so many drafts are wrong (a random model only loops): the
    rejected ones' cache slots are overwritten and the tokens stay HF's greedy tokens. Verified in
    the CPU's one-call decode step (a row per draft), or as a prompt chunk through the module path
    (what a GPU does)."""
    from starchat.model.loader import EMBEDDED_MODEL_DIR

    reference = HFModel.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32).eval()
    engine = make_engine(EMBEDDED_MODEL_DIR, num_speculative_tokens=5)
    if verify_in == "module path":
        engine.runner.model.fused_decode = None
    prompts = ["def add(a, b):\n    return a + b\n\n\ndef subtract(a, b):\n", "import os\nimport sys\nimport",
               "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
               "        self.items.append(item)\n\n    def pop(self):\n"]
    ids = [engine.tokenizer.encode(prompt) for prompt in prompts]
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    out, _ = run(engine, ids, params)
    expected = [hf_greedy(reference, prompt_ids, params.max_new_tokens) for prompt_ids in ids]
    assert [tokens(deltas) for deltas in out] == expected
    stats = engine.stats()
    assert 0 < stats.spec_decode_accepted_tokens < stats.spec_decode_draft_tokens

    # In a cache too small for all three: preemptions, blocks taken for drafts and given back.
    config = engine.model_config
    per_token = config.n_layer * 2 * config.kv_dim * 4
    crowded = make_engine(EMBEDDED_MODEL_DIR, num_speculative_tokens=5, kv_cache_memory_bytes=per_token * 16 * 12)
    if verify_in == "module path":
        crowded.runner.model.fused_decode = None
    out, _ = run(crowded, ids, params)
    assert [tokens(deltas) for deltas in out] == expected
    assert crowded.stats().num_preemptions > 0 and crowded.stats().spec_decode_accepted_tokens > 0
    assert crowded.stats().kv_cache_used_blocks == 0
