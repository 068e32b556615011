"""Prefix caching: a prompt's already-computed prefix is taken from the KV cache, not recomputed,
and the tokens stay those of HF transformers' model (the reference) computing everything."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTBigCodeForCausalLM as HFModel

from reference_checkpoints import hf_greedy
from starchat import SamplingParams
from starchat.config import EngineConfig
from starchat.engine.engine import LLMEngine
from starchat.engine.kv_cache import BlockAllocator, block_hashes

BLOCK = 16
SYSTEM = "# A helper library for parsing configuration files and validating their fields.\n" * 6
QUESTIONS = ["def parse(path):", "class Validator:\n    def check(self, field):", "import os\n\nDEFAULTS = {"]
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


def hashes_of(tokens: list[int], num_blocks: int) -> list[bytes]:
    return block_hashes([], tokens.__getitem__, BLOCK, num_blocks)


# ---- the allocator ---------------------------------------------------------------------------


def test_block_hashes_chain_the_whole_prefix():
    tokens = list(range(100, 164))  # four blocks
    changed = tokens.copy()
    changed[20] = 7  # in block 1
    same, other = hashes_of(tokens, 4), hashes_of(changed, 4)
    assert same == hashes_of(list(tokens), 4) and len(set(same)) == 4
    assert other[0] == same[0]
    assert all(a != b for a, b in zip(other[1:], same[1:]))  # every block after the change differs too
    # Equal tokens at another position are another block: the hash covers everything before it.
    shifted = [0] * BLOCK + tokens[:48]
    assert hashes_of(shifted, 4)[1] != same[0]
    # Extending a list computes only the missing blocks.
    partial = hashes_of(tokens, 2)
    assert block_hashes(partial, tokens.__getitem__, BLOCK, 4) == same


def test_cached_blocks_are_shared_counted_and_evicted_least_recent_first():
    allocator = BlockAllocator(num_blocks=6, block_size=BLOCK)
    first: list[int] = []
    assert allocator.grow(first, 3 * BLOCK)
    hashes = hashes_of(list(range(3 * BLOCK)), 3)
    for block, block_hash in zip(first, hashes):
        allocator.register(block, block_hash)
    assert allocator.num_cached_blocks == 3 and allocator.num_free_blocks == 3

    blocks = first.copy()
    shared = allocator.take_cached(hashes[:2] + [b"not cached"])
    assert shared == blocks[:2]
    allocator.release(first)  # (and empties the list)
    # Block 2 is idle (cached, held by nobody): free to take, but still found.
    assert allocator.num_used_blocks == 2 and allocator.num_free_blocks == 4
    again = allocator.take_cached(hashes)
    assert again == blocks and allocator.num_used_blocks == 3  # the idle one is held again
    allocator.release(shared)
    allocator.release(again)
    assert allocator.num_used_blocks == 0 and allocator.num_cached_blocks == 3

    # Taking blocks uses the empty ones first, then evicts idle ones: the tail of the last
    # released sequence before its head.
    taken: list[int] = []
    assert allocator.grow(taken, 4 * BLOCK)
    assert taken == sorted(set(range(6)) - set(blocks)) + [blocks[2]]
    assert allocator.take_cached(hashes) == blocks[:2]  # block 2 gone, so the chain stops there
    assert allocator.num_cached_blocks == 2
    assert not allocator.grow(taken, 5 * BLOCK)  # nothing left: two held, four taken


def test_a_hash_computed_twice_keeps_its_first_block():
    allocator = BlockAllocator(num_blocks=4, block_size=BLOCK)
    a: list[int] = []
    b: list[int] = []
    allocator.grow(a, BLOCK)
    allocator.grow(b, BLOCK)
    block_hash = hashes_of(list(range(BLOCK)), 1)[0]
    allocator.register(a[0], block_hash)
    allocator.register(b[0], block_hash)
    duplicate = b[0]
    allocator.release(b)
    assert allocator.num_cached_blocks == 1 and allocator.take_cached([block_hash]) == a[:1]
    taken: list[int] = []
    allocator.grow(taken, BLOCK)
    assert taken == [2]  # empty blocks first; the duplicate was freed as empty, behind them
    allocator.grow(taken, 3 * BLOCK)
    assert duplicate in taken


# ---- the engine ------------------------------------------------------------------------------


class TokenCounter:
    """Counts the tokens the model computes: its forward passes, and on a CPU the one-call native
    decode steps."""

    def __init__(self, engine: LLMEngine):
        self.computed = 0
        model = engine.runner.model
        model.register_forward_hook(self._count)
        fused = model.fused_decode
        if fused is not None:
            native_step = fused.step

            def counted_step(token_ids, *args, **kwargs):
                self.computed += len(token_ids)
                return native_step(token_ids, *args, **kwargs)

            fused.step = counted_step

    def _count(self, module, args, output):
        self.computed += args[0].numel()


def make_engine(model_dir, **options) -> tuple[LLMEngine, TokenCounter]:
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", **options), progress=False)
    return engine, TokenCounter(engine)


def run(engine: LLMEngine, prompts: dict[str, list[int]], params: SamplingParams = GREEDY) -> dict[str, list]:
    for request_id, prompt in prompts.items():
        engine.add_request(prompt, params, request_id=request_id)
    out: dict[str, list] = {request_id: [[], None, None] for request_id in prompts}  # tokens, last delta, prompt logprobs
    while engine.has_unfinished_requests():
        for delta in engine.step():
            out[delta.request_id][0].extend(delta.token_ids)
            if delta.prompt_logprobs is not None:
                assert out[delta.request_id][2] is None  # once
                out[delta.request_id][2] = delta.prompt_logprobs
            if delta.finished:
                out[delta.request_id][1] = delta
    return out


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return HFModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_a_shared_prefix_is_computed_once_and_tokens_equal_hf(tiny_model_dir, reference):
    engine, counter = make_engine(tiny_model_dir)
    system = engine.tokenizer.encode(SYSTEM)
    prompts = [system + engine.tokenizer.encode(question) for question in QUESTIONS]
    first = run(engine, {"0": prompts[0]})["0"]
    assert first[1].num_cached_tokens == 0
    assert counter.computed == len(prompts[0]) + GREEDY.max_new_tokens - 1

    counter.computed = 0
    rest = run(engine, {str(i): prompts[i] for i in (1, 2)})
    reused = len(system) // BLOCK * BLOCK  # whole blocks of the shared part
    assert reused >= 3 * BLOCK
    for i in (1, 2):
        assert rest[str(i)][1].num_cached_tokens == reused
    # The second and third prompts computed only what follows the shared blocks.
    assert counter.computed == sum(len(prompts[i]) - reused + GREEDY.max_new_tokens - 1 for i in (1, 2))
    stats = engine.stats()
    assert stats.prefix_cache_hits == 2 * reused
    assert stats.prefix_cache_queries == sum(len(prompt) for prompt in prompts)

    for i, prompt in enumerate(prompts):
        tokens = first[0] if i == 0 else rest[str(i)][0]
        assert tokens == hf_greedy(reference, prompt, GREEDY.max_new_tokens), i
    assert engine.stats().kv_cache_used_blocks == 0  # cached blocks held by nobody count as free


def test_requests_admitted_together_share_what_the_first_computes(tiny_model_dir, reference):
    """n samples of one prompt (OpenAI's `n`), or a burst of requests with one system prompt:
    the first request's blocks are registered when its step is scheduled, and the others, admitted
    in the same step, read them from the cache after that step has written them."""
    engine, counter = make_engine(tiny_model_dir)
    system = engine.tokenizer.encode(SYSTEM)
    same = system + engine.tokenizer.encode(QUESTIONS[0])
    prompts = {"same-0": same, "same-1": same, "same-2": same,
               "other": system + engine.tokenizer.encode(QUESTIONS[1])}
    out = run(engine, prompts)
    assert engine.stats().num_running == 0
    whole_blocks = (len(same) - 1) // BLOCK * BLOCK
    assert [out[key][1].num_cached_tokens for key in prompts] == [0, whole_blocks, whole_blocks,
                                                                  len(system) // BLOCK * BLOCK]
    prefill = len(same) + 2 * (len(same) - whole_blocks) + len(prompts["other"]) - len(system) // BLOCK * BLOCK
    assert counter.computed == prefill + 4 * (GREEDY.max_new_tokens - 1)
    expected = hf_greedy(reference, same, GREEDY.max_new_tokens)
    assert out["same-0"][0] == out["same-1"][0] == out["same-2"][0] == expected
    assert out["other"][0] == hf_greedy(reference, prompts["other"], GREEDY.max_new_tokens)


def test_a_failed_step_forgets_the_cache(tiny_model_dir, reference):
    engine, _ = make_engine(tiny_model_dir)
    prompt = engine.tokenizer.encode(SYSTEM)
    run(engine, {"warm": prompt})
    assert engine.scheduler.allocator.num_cached_blocks > 0
    launch = engine.runner.launch

    def failing(batch):
        launch(batch)  # the kernels ran, or some of them: the blocks' contents are unknown
        raise RuntimeError("device lost")

    engine.runner.launch = failing
    engine.add_request(prompt + [5], GREEDY, request_id="fails")
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    engine.abort_request("fails")
    engine.runner.launch = launch
    allocator = engine.scheduler.allocator
    assert allocator.num_cached_blocks == 0 and allocator.num_used_blocks == 0
    again = run(engine, {"again": prompt})["again"]
    assert again[1].num_cached_tokens == 0
    assert again[0] == hf_greedy(reference, prompt, GREEDY.max_new_tokens)


def test_a_whole_cached_prompt_still_computes_its_last_token(tiny_model_dir, reference):
    engine, counter = make_engine(tiny_model_dir)
    prompt = engine.tokenizer.encode(SYSTEM)[: 3 * BLOCK]  # exactly three blocks
    assert len(prompt) == 3 * BLOCK
    run(engine, {"a": prompt})
    counter.computed = 0
    again = run(engine, {"b": prompt})["b"]
    # Two blocks come from the cache; the third is computed, for the last token's logits, into a
    # block of its own (a cached block is never written to).
    assert again[1].num_cached_tokens == 2 * BLOCK
    assert counter.computed == BLOCK + GREEDY.max_new_tokens - 1
    assert again[0] == hf_greedy(reference, prompt, GREEDY.max_new_tokens)


def test_a_chat_turn_reuses_the_previous_turn_and_its_reply(tiny_model_dir, reference):
    engine, counter = make_engine(tiny_model_dir)
    tokenize = engine.tokenizer.encode
    turn_1 = tokenize("<|system|>\n" + SYSTEM + "<|end|>\n<|user|>\nWrite a parser<|end|>\n<|assistant|>")
    reply = run(engine, {"1": turn_1})["1"][0]
    turn_2 = turn_1 + reply + tokenize("<|end|>\n<|user|>\nNow test it<|end|>\n<|assistant|>")
    counter.computed = 0
    second = run(engine, {"2": turn_2})["2"]
    # Everything up to the last full block of turn 1's prompt and its generated reply is reused
    # (the reply's last token was sampled, never computed).
    assert second[1].num_cached_tokens == (len(turn_1) + len(reply) - 1) // BLOCK * BLOCK
    assert counter.computed == len(turn_2) - second[1].num_cached_tokens + GREEDY.max_new_tokens - 1
    assert second[0] == hf_greedy(reference, turn_2, GREEDY.max_new_tokens)


def test_prefix_caching_changes_no_token_in_a_crowded_cache(tiny_model_dir):
    """Preemptions and evictions with prefix caching on: every request's greedy and seeded tokens
    equal those of an engine without it, and all blocks come back."""
    per_token = 2 * 2 * 16 * 4  # layers * (k, v) * kv_dim * float32
    options = dict(kv_cache_memory_bytes=per_token * BLOCK * 20, max_num_batched_tokens=48)
    cached, counter = make_engine(tiny_model_dir, **options)
    plain, plain_counter = make_engine(tiny_model_dir, enable_prefix_caching=False, **options)
    system = cached.tokenizer.encode(SYSTEM)
    prompts = {f"{i}-{j}": system[: 40 + 9 * i] + cached.tokenizer.encode(question)
               for i in range(3) for j, question in enumerate(QUESTIONS)}
    sampled = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True)
    for params in (GREEDY, sampled):
        # Two waves: the second finds the first's blocks, some evicted meanwhile.
        for wave in ("a", "b"):
            ours = run(cached, {f"{wave}{key}": prompt for key, prompt in prompts.items()}, params)
            expected = run(plain, {f"{wave}{key}": prompt for key, prompt in prompts.items()}, params)
            assert {k: v[0] for k, v in ours.items()} == {k: v[0] for k, v in expected.items()}
    assert cached.stats().num_preemptions > 0
    assert cached.stats().prefix_cache_hits > 0 and plain.stats().prefix_cache_hits == 0
    assert counter.computed < plain_counter.computed
    assert cached.stats().kv_cache_used_blocks == 0
    allocator = cached.scheduler.allocator
    assert allocator.num_free_blocks == allocator.num_blocks and allocator.num_cached_blocks > 0


def test_an_admission_that_does_not_fit_gives_its_cached_blocks_back(tiny_model_dir):
    per_token = 2 * 2 * 16 * 4
    engine, _ = make_engine(tiny_model_dir, kv_cache_memory_bytes=per_token * BLOCK * 8, max_num_seqs=4)
    prompt = engine.tokenizer.encode(SYSTEM)[: 4 * BLOCK + 3]
    run(engine, {"warm": prompt})
    allocator = engine.scheduler.allocator
    assert allocator.num_cached_blocks == 4
    # "big" takes 5 of the 8 blocks (the 4 empty ones and the idle tail of "warm"); "waits" finds 3
    # cached blocks but needs 2 more to compute the rest, and none are left: it waits, and the
    # blocks it looked up are idle again, still cached.
    engine.add_request(list(range(1000, 1000 + 5 * BLOCK - 4)), SamplingParams(max_new_tokens=3), request_id="big")
    engine.add_request(prompt, SamplingParams(max_new_tokens=1), request_id="waits")
    engine.step()
    assert [r.request_id for r in engine.scheduler.waiting] == ["waits"]
    assert engine.scheduler.waiting[0].block_ids == [] and engine.scheduler.waiting[0].num_computed_tokens == 0
    # 5 held by "big" (4 of them registered after its prompt step), 3 idle ones of "warm"
    assert allocator.num_used_blocks == 5 and allocator.num_cached_blocks == 4 + 3
    while engine.has_unfinished_requests():
        engine.step()
    assert allocator.num_used_blocks == 0


def test_prompt_logprobs_score_every_position_even_when_cached_and_preempted(tiny_model_dir):
    """A request for prompt log-probabilities computes its whole prompt (a cached prefix has no
    logits to score with); preempted and recomputed, it still reports each position once."""
    per_token = 2 * 2 * 16 * 4
    crowded, _ = make_engine(tiny_model_dir, kv_cache_memory_bytes=per_token * BLOCK * 12, max_num_batched_tokens=32)
    roomy, _ = make_engine(tiny_model_dir, enable_prefix_caching=False)
    system = crowded.tokenizer.encode(SYSTEM)
    scoring = SamplingParams(max_new_tokens=30, ignore_eos=True, prompt_logprobs=1)
    prompts = {f"{i}": system[:60] + crowded.tokenizer.encode(question) for i, question in enumerate(QUESTIONS)}
    run(crowded, {"warm": system[:60]})  # the shared part is cached
    ours = run(crowded, prompts, scoring)
    expected = run(roomy, prompts, scoring)
    assert crowded.stats().num_preemptions > 0
    for key in prompts:
        delta = ours[key][1]
        assert delta.num_cached_tokens == 0
        assert [e.token_id for e in ours[key][2][1:]] == [e.token_id for e in expected[key][2][1:]]
        torch.testing.assert_close(torch.tensor([e.logprob for e in ours[key][2][1:]]),
                                   torch.tensor([e.logprob for e in expected[key][2][1:]]), rtol=1e-4, atol=1e-4)
        assert len(ours[key][2]) == len(prompts[key]) and ours[key][0] == expected[key][0]


def test_cancelling_a_request_leaves_the_blocks_it_shares_intact(tiny_model_dir, reference):
    engine, _ = make_engine(tiny_model_dir)
    system = engine.tokenizer.encode(SYSTEM)
    first, second = (system + engine.tokenizer.encode(question) for question in QUESTIONS[:2])
    tokens: dict[str, list[int]] = {"first": [], "second": []}

    def step() -> None:
        for delta in engine.step():
            tokens[delta.request_id] += delta.token_ids

    engine.add_request(first, GREEDY, request_id="first")
    step()  # first's prompt computed (and its blocks registered)
    engine.add_request(second, GREEDY, request_id="second")
    step()  # second admitted on first's cached blocks
    shared = engine.scheduler.running[1].block_ids[:len(system) // BLOCK]
    assert shared and shared == engine.scheduler.running[0].block_ids[:len(shared)]
    engine.abort_request("first")
    while engine.has_unfinished_requests():
        step()
    assert tokens["second"] == hf_greedy(reference, second, GREEDY.max_new_tokens)
    assert engine.stats().kv_cache_used_blocks == 0
    again = run(engine, {"again": second})["again"]  # the shared blocks are still cached
    assert again[1].num_cached_tokens >= len(shared) * BLOCK
    assert again[0] == tokens["second"]
