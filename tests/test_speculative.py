"""Speculative decoding with n-gram drafts: fewer steps, exactly the tokens of greedy decoding
(HF transformers' `generate` is the reference), stop conditions honoured inside a verified run,
sampled tokens distributed as without drafts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPTBigCodeForCausalLM as HFModel

from reference_checkpoints import hf_greedy
from starchat import SamplingParams
from starchat.config import EngineConfig
from starchat.engine.engine import LLMEngine
from starchat.engine.request import Request
from starchat.engine.sampler import Sampler
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
    # The logprobs one speculated too: its logprobs come from the verified rows.
    assert [lp.logprob for d in ours[2] for lp in d.logprobs] == pytest.approx(
        [lp.logprob for d in expected[2] for lp in d.logprobs], abs=1e-4)
    assert [[alt[0] for lp in d.logprobs for alt in lp.top] for d in ours[2]] == \
        [[alt[0] for lp in d.logprobs for alt in lp.top] for d in expected[2]]
    assert ours[1][-1].seed == 5  # seeded sampling is not drafted for: the seed still gives its tokens
    drafted = speculative.stats().spec_decode_draft_tokens
    assert drafted > 0
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


@pytest.fixture(scope="module")
def embedded_reference():
    from starchat.model.loader import EMBEDDED_MODEL_DIR

    return HFModel.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32).eval()


def verify_through(engine: LLMEngine, path: str) -> None:
    """Where the engine's verify steps run: the CPU's one-call decode step, the module path (as a
    GPU runs steps eagerly), or the fixed-shape step that CUDA graphs replay, without capture."""
    if path != "native decode step":
        engine.runner.model.fused_decode = None
    if path == "static step":
        engine.runner.enable_static_decode(max_batch=32, max_context=engine.max_model_len, capture=False)


@pytest.mark.parametrize("verify_in", ["native decode step", "module path", "static step"])
def test_rejected_drafts_leave_no_trace_on_a_trained_model(verify_in, embedded_reference):
    """starchat-nano writes real code, so many drafts are wrong (a random model only loops): the
    rejected ones' cache slots are overwritten and the tokens stay HF's greedy tokens. A draft is
    a decode row that attends to the rows before it, verified in each kind of step."""
    from starchat.model.loader import EMBEDDED_MODEL_DIR

    reference = embedded_reference
    engine = make_engine(EMBEDDED_MODEL_DIR, num_speculative_tokens=5)
    verify_through(engine, verify_in)
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
    verify_through(crowded, verify_in)
    out, _ = run(crowded, ids, params)
    assert [tokens(deltas) for deltas in out] == expected
    assert crowded.stats().num_preemptions > 0 and crowded.stats().spec_decode_accepted_tokens > 0
    assert crowded.stats().kv_cache_used_blocks == 0
    if verify_in == "static step":  # verify steps had fixed-shape steps of their own
        assert any(shared for _, _, shared in engine.runner.decode_graphs.steps)


def reference_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> np.ndarray:
    """softmax(logits / T), cut to the smallest most-likely set reaching top_p, renormalised."""
    probs = np.exp(logits.double().numpy() / temperature)
    probs /= probs.sum()
    order = np.argsort(-probs)
    kept = order[:int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)]
    out = np.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


def test_sampled_verification_keeps_the_models_distribution():
    """20,000 requests verify the same two drafts against the same three rows of logits: the first
    token is distributed as the first row says; given that it was the first draft, the second as
    the second row says; given both drafts, the third as the third row says. (Keeping a draft
    whenever it is possible, or drawing from the whole row after a rejection, moves the first
    token's distribution by 0.1 or more here.)"""
    vocab, trials = 8, 20_000
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(3)) * 1.5
    params = SamplingParams(do_sample=True, temperature=0.9, top_p=0.95, max_new_tokens=8)
    expected = [reference_distribution(row, params.temperature, params.top_p) for row in logits]
    drafts = [int(np.argsort(-expected[0])[1]), int(np.argmax(expected[1]))]  # a likely and a likelier guess
    requests = [Request(str(i), [1, 2], params, frozenset(), 64, generator=torch.Generator().manual_seed(i))
                for i in range(trials)]
    outputs = Sampler(eos_token_id=0).verify(logits.repeat(trials, 1), None, [(r, drafts) for r in requests])
    results = [output.token_ids for output in outputs]
    assert all(1 <= len(tokens) <= 3 and tokens[:-1] == drafts[:len(tokens) - 1] for tokens in results)

    def total_variation(samples: list[int], probs: np.ndarray) -> float:
        counts = np.bincount(samples, minlength=vocab) / len(samples)
        assert counts[probs == 0].sum() == 0  # nothing outside top-p
        return 0.5 * np.abs(counts - probs).sum()

    first = [tokens[0] for tokens in results]
    second = [tokens[1] for tokens in results if tokens[0] == drafts[0]]  # the first draft kept
    third = [tokens[2] for tokens in results if tokens[:2] == drafts]
    assert len(second) > 2_000 and len(third) > 600
    assert total_variation(first, expected[0]) < 0.02
    assert total_variation(second, expected[1]) < 0.03
    assert total_variation(third, expected[2]) < 0.05


def test_each_row_is_penalised_for_the_drafts_before_it():
    """OpenAI's frequency penalty by hand: token 5 leads every row by 3 logits; it was generated
    once before and is drafted twice. Row 0 (count 1, minus 2) keeps it, row 1 (count 2 with the
    first draft, minus 4) does not: the step yields [5, the runner-up of row 1]."""
    logits = torch.zeros(3, 8)
    logits[:, 5] = 3.0
    logits[1, 2] = 0.5  # row 1's runner-up
    params = SamplingParams(max_new_tokens=8, frequency_penalty=2.0)
    request = Request("r", [1, 2], params, frozenset(), 64, output_token_ids=[5])
    (output,) = Sampler(eos_token_id=0).verify(logits, logits.argmax(dim=-1), [(request, [5, 5])])
    assert output.token_ids == [5, 2]


def test_sampling_and_penalties_verify_row_by_row_like_hf(embedded_reference):
    """Sampling with top_k=1 keeps a draft exactly when it is the row's argmax (p = 1, else 0), and
    penalties must count the drafts before each row: greedy and sampled requests with a repetition
    penalty give HF's greedy tokens with that penalty, drafts accepted and rejected."""
    from starchat.model.loader import EMBEDDED_MODEL_DIR

    engine = make_engine(EMBEDDED_MODEL_DIR, num_speculative_tokens=4)
    prompts = ["import os\nimport sys\nimport", "def add(a, b):\n    return a + b\n\n\ndef subtract(a, b):\n"]
    ids = [engine.tokenizer.encode(prompt) for prompt in prompts]
    greedy = SamplingParams(max_new_tokens=40, ignore_eos=True, repetition_penalty=1.2)
    top1 = SamplingParams(max_new_tokens=40, ignore_eos=True, repetition_penalty=1.2, do_sample=True, top_k=1)
    out, _ = run(engine, ids + ids, [greedy, greedy, top1, top1])
    expected = [hf_greedy(embedded_reference, prompt_ids, 40, repetition_penalty=1.2) for prompt_ids in ids]
    assert [tokens(deltas) for deltas in out] == expected + expected
    stats = engine.stats()
    assert 0 < stats.spec_decode_accepted_tokens < stats.spec_decode_draft_tokens
    assert out[2][-1].seed is None  # drafted for: no seed reproduces these draws

    # Drafts come from the sequence, so a once-per-token penalty has already hit them; a frequency
    # penalty counts each occurrence, the drafts before a row included (reference: the plain engine,
    # whose penalties test_sampling checks against OpenAI's formula).
    counted = SamplingParams(max_new_tokens=40, ignore_eos=True, frequency_penalty=0.4, presence_penalty=0.2)
    plain = make_engine(EMBEDDED_MODEL_DIR)
    drafted = engine.stats().spec_decode_draft_tokens
    out, _ = run(engine, ids, counted)
    assert [tokens(deltas) for deltas in out] == [tokens(deltas) for deltas in run(plain, ids, counted)[0]]
    assert engine.stats().spec_decode_draft_tokens > drafted


def test_sampled_requests_are_drafted_for_and_stream_whole():
    from starchat.model.loader import EMBEDDED_MODEL_DIR

    # (A random model's next-token distributions are nearly flat: sampled, it never repeats itself.)
    engine = make_engine(EMBEDDED_MODEL_DIR, num_speculative_tokens=5)
    prompt = engine.tokenizer.encode("import os\nimport sys\nimport")
    params = SamplingParams(max_new_tokens=40, ignore_eos=True, do_sample=True, temperature=0.3, logprobs=1)
    (deltas,), steps = run(engine, [prompt], params)
    assert engine.stats().spec_decode_accepted_tokens > 0 and steps < 40
    assert len(tokens(deltas)) == 40 and all(len(d.token_ids) == 1 and len(d.logprobs) == 1 for d in deltas)
    assert "".join(d.text for d in deltas) == engine.tokenizer.decode(tokens(deltas))
