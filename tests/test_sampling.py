"""Sampling controls, stop conditions, seeds and validation through the public API."""

from __future__ import annotations

import pytest
import torch

from starchat import LLM, SamplingParams, SamplingParamsError
from starchat.chat_template import fim_prompt


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), dtype="float32", progress=False)


@pytest.mark.parametrize("bad, field", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(typical_p=0.0), "typical_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(typical_p=float("nan")), "typical_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(min_new_tokens=10, max_new_tokens=5), "min_new_tokens"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(logprobs=100), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(seed=-1), "seed"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(logit_bias={5: 101.0}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
])
def test_invalid_parameters_name_the_field(llm, bad, field):
    with pytest.raises(SamplingParamsError) as error:
        llm.generate(["def f():"], SamplingParams(**bad))
    assert error.value.field == field


def test_engine_level_checks_name_the_field(llm):
    from starchat.engine.engine import RequestError

    with pytest.raises(SamplingParamsError) as error:
        llm.generate(["def f():"], SamplingParams(stop_token_ids=[10**6]))
    assert error.value.field == "stop_token_ids"
    with pytest.raises(SamplingParamsError, match="outside the vocabulary") as error:
        llm.generate(["def f():"], SamplingParams(logit_bias={10**6: 1.0}))
    assert error.value.field == "logit_bias"
    with pytest.raises(RequestError) as error:
        llm.generate(["\ud800 lone surrogate"], SamplingParams())
    assert error.value.field == "prompt"
    with pytest.raises(RequestError) as error:
        llm.generate([""], SamplingParams())
    assert error.value.field == "prompt"


def test_max_new_tokens_beyond_the_context_is_a_clear_error(llm):
    with pytest.raises(SamplingParamsError, match="max_new_tokens.*context"):
        llm.generate(["def f():"], SamplingParams(max_new_tokens=10_000))


def test_same_seed_same_text_any_batch(llm):
    params = SamplingParams(max_new_tokens=20, do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=1234,
                            ignore_eos=True)
    alone = llm.generate(["def f():"], params)[0]
    together = llm.generate(["import os", "def f():", "class A:"], [params.copy(seed=5), params, params.copy(seed=6)])
    assert together[1].token_ids == alone.token_ids
    assert together[0].token_ids != alone.token_ids or together[2].token_ids != alone.token_ids
    other_seed = llm.generate(["def f():"], params.copy(seed=99))[0]
    assert other_seed.token_ids != alone.token_ids


def test_temperature_zero_and_do_sample_false_are_greedy(llm):
    greedy = llm.generate(["def f():"], SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    zero = llm.generate(["def f():"], SamplingParams(max_new_tokens=10, do_sample=True, temperature=0.0, ignore_eos=True))[0]
    assert greedy.token_ids == zero.token_ids


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate(["def f():"], SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    top1 = llm.generate(["def f():"], SamplingParams(max_new_tokens=10, do_sample=True, top_k=1, seed=3, ignore_eos=True))[0]
    assert greedy.token_ids == top1.token_ids


def test_stop_string_across_token_boundaries_is_cut_and_not_included(llm):
    full = llm.generate(["def f():"], SamplingParams(max_new_tokens=30, ignore_eos=True))[0]
    text = full.text
    # A stop string made of the end of one token and the start of the next.
    boundary = len(llm.tokenizer.decode(full.token_ids[:5]))
    stop = text[boundary - 2: boundary + 2]
    assert len(stop) == 4
    stopped = llm.generate(["def f():"], SamplingParams(max_new_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.stop_reason == stop
    assert stopped.text == text[: text.index(stop)]
    assert stop not in stopped.text


def test_a_character_cut_by_the_end_of_generation_ends_the_text_as_a_whole_decode_does(llm):
    # "😀" is two tokens, the first holding only the character's first bytes: end right after it.
    first_bytes = llm.tokenizer.encode("😀")[0]
    assert llm.tokenizer.token_text(first_bytes) == "\ufffd"
    params = SamplingParams(max_new_tokens=3, logit_bias={first_bytes: 100.0})
    cut = llm.generate(["def f():"], params)[0]
    assert cut.token_ids == [first_bytes] * 3 and cut.finish_reason == "length"
    assert cut.text == llm.tokenizer.decode(cut.token_ids) == "\ufffd" * 3  # not dropped
    assert "".join(delta.text for delta in llm.stream("def f():", params)) == cut.text
    # Text held back with the incomplete character still meets the stop strings: ' ' + a first byte.
    spaced = next(i for i in range(llm.tokenizer.vocab_size) if llm.tokenizer.token_text(i) == " \ufffd")
    stopped = llm.generate(["def f():"], SamplingParams(max_new_tokens=2, logit_bias={spaced: 100.0}, stop=["\ufffd \ufffd"]))[0]
    assert (stopped.text, stopped.finish_reason, stopped.stop_reason) == (" ", "stop", "\ufffd \ufffd")


def test_stop_token_ids_and_min_new_tokens(llm):
    full = llm.generate(["def f():"], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    stop_id = full.token_ids[3]
    first = full.token_ids.index(stop_id)
    stopped = llm.generate(["def f():"], SamplingParams(max_new_tokens=20, stop_token_ids=[stop_id]))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == full.token_ids[: first + 1]
    assert stopped.text == llm.tokenizer.decode(full.token_ids[:first])
    # min_new_tokens forbids the stop token until enough tokens exist.
    held = llm.generate(["def f():"], SamplingParams(max_new_tokens=20, min_new_tokens=first + 2, stop_token_ids=[stop_id]))[0]
    assert stop_id not in held.token_ids[: first + 2]


def test_repetition_penalty_changes_greedy_choice_away_from_repeats(llm):
    plain = llm.generate(["def f():"], SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    penalised = llm.generate(["def f():"], SamplingParams(max_new_tokens=16, ignore_eos=True, repetition_penalty=5.0))[0]
    repeats = lambda ids: len(ids) - len(set(ids))
    assert repeats(penalised.token_ids) < repeats(plain.token_ids)


def test_logprobs_top_n_sorted_and_include_greedy_choice(llm):
    completion = llm.generate(["def f():"], SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=3))[0]
    assert len(completion.logprobs) == 5
    for token_id, entry in zip(completion.token_ids, completion.logprobs):
        assert entry.token_id == token_id
        assert [t for t, _, _ in entry.top][0] == token_id  # greedy picks the most likely
        values = [lp for _, _, lp in entry.top]
        assert values == sorted(values, reverse=True) and len(values) == 3


def test_fill_in_the_middle_prompt_uses_fim_tokens(llm):
    prompt = fim_prompt("def add(a, b):\n    ", "\n    return result\n")
    ids = llm.tokenizer.encode(prompt)
    assert ids[0] == 1 and 3 in ids and ids[-1] == 2  # <fim_prefix> ... <fim_suffix> ... <fim_middle>
    assert llm.generate([prompt], SamplingParams(max_new_tokens=4))[0].prompt_token_ids == ids


def test_chat_stops_on_end_token_and_strips(llm):
    completion = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=8), system="default")
    assert completion.prompt_token_ids[-1] == llm.tokenizer.token_id("<|assistant|>")
    assert completion.text == completion.text.lstrip()
    assert 49155 in llm.engine.chat_request([{"role": "user", "content": "x"}])[1].stop_token_ids


def test_stream_deltas_concatenate_to_the_completion(llm):
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    completion = llm.generate(["def f():"], params)[0]
    deltas = list(llm.stream("def f():", params))
    assert "".join(d.text for d in deltas) == completion.text
    assert [t for d in deltas for t in d.token_ids] == completion.token_ids
    assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])


def test_sampler_greedy_rows_equal_torch_argmax_with_ties_and_nan():

    from starchat.engine.request import Request
    from starchat.engine.sampler import Sampler

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 49152, generator=generator)
    logits[1, [7, 300, 40000]] = 100.0  # a tie: the first index wins in both
    logits[2, 123] = float("nan")  # a NaN row: its index, as torch.argmax gives
    greedy = SamplingParams(max_new_tokens=4)
    sampled = SamplingParams(max_new_tokens=4, do_sample=True, temperature=0.7, seed=1)

    def request(params, index):
        return Request(str(index), [1, 2, 3], params, frozenset(), 100, generator=torch.Generator().manual_seed(index))

    expected = logits.argmax(dim=-1).tolist()
    assert expected[1] == 7 and expected[2] == 123
    all_greedy = Sampler(eos_token_id=0)(logits, [request(greedy, i) for i in range(5)])
    assert all_greedy.token_ids == expected
    mixed = Sampler(eos_token_id=0)(logits, [request(sampled if i % 2 else greedy, i) for i in range(5)])
    assert [mixed.token_ids[i] for i in (0, 2, 4)] == [expected[i] for i in (0, 2, 4)]


def test_sampler_takes_given_greedy_tokens_only_for_unchanged_logits():
    """The CPU decode step hands the sampler each row's argmax; a repetition penalty or a
    min_new_tokens block changes the logits, and then the sampler chooses again."""

    from starchat.engine.request import Request
    from starchat.engine.sampler import Sampler

    logits = torch.zeros(2, 50)
    logits[:, 3] = 5.0  # token 3: both rows' argmax, and in the prompt
    logits[:, 9] = 1.0  # the runner-up
    given = torch.tensor([3, 3])

    def request(**params):
        return Request("r", [1, 2, 3], SamplingParams(max_new_tokens=4, **params), frozenset(), 100)

    marked = torch.tensor([17, 3])  # not an argmax: shows whether the sampler used what it was given
    assert Sampler(eos_token_id=0)(logits, [request(), request()], greedy_tokens=marked).token_ids == [17, 3]
    penalised = Sampler(eos_token_id=0)(logits, [request(repetition_penalty=100.0), request()], greedy_tokens=given)
    assert penalised.token_ids == [9, 3]  # 5 / 100 falls below 1: the penalised row chose again
    blocked = Sampler(eos_token_id=3)(logits, [request(min_new_tokens=2), request(min_new_tokens=2)], greedy_tokens=given)
    assert blocked.token_ids == [9, 9]  # the end token is barred before min_new_tokens


def openai_reference(reference, prompt_ids: list[int], new_tokens: int, presence: float, frequency: float,
                     bias: dict[int, float]) -> list[int]:
    """Greedy decoding written from OpenAI's description of the parameters, on HF transformers'
    logits: logit[j] -= count[j] * frequency + (count[j] > 0) * presence, counts over the tokens
    generated so far, then logit[j] += bias[j]."""

    ids = list(prompt_ids)
    generated: list[int] = []
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = reference(torch.tensor([ids])).logits[0, -1].double().tolist()
        for token in set(generated):
            count = generated.count(token)
            logits[token] -= count * frequency + presence
        for token, value in bias.items():
            logits[token] += value
        chosen = max(range(len(logits)), key=logits.__getitem__)
        generated.append(chosen)
        ids.append(chosen)
    return generated


@pytest.mark.parametrize("presence, frequency, bias", [
    (0.0, 2.0, {}),
    (1.5, 0.0, {}),
    (-0.5, 0.7, {}),
    (0.0, 0.0, "ban the first two greedy tokens, favour a third"),
])
def test_presence_frequency_and_logit_bias_follow_openai_on_hf_logits(llm, tiny_model_dir, presence, frequency, bias):
    from transformers import GPTBigCodeForCausalLM as HFModel

    reference = HFModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = llm.tokenizer.encode("def repeat(items):\n    for item in items:")
    plain = llm.generate([prompt], SamplingParams(max_new_tokens=24, ignore_eos=True))[0].token_ids
    if isinstance(bias, str):
        bias = {plain[0]: -100.0, plain[1]: -100.0, 1234: 3.0}
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, presence_penalty=presence, frequency_penalty=frequency,
                            logit_bias=bias)
    ours = llm.generate([prompt], params)[0].token_ids
    assert ours == openai_reference(reference, prompt, 24, presence, frequency, bias)
    assert ours != plain  # the parameters did something here (the cases are chosen so)
    # Alongside other requests in one batch: the same tokens (penalties are per row).
    batched = llm.generate([prompt, prompt, "x = 1"], [params, SamplingParams(max_new_tokens=24, ignore_eos=True),
                                                        params])
    assert batched[0].token_ids == ours and batched[1].token_ids == plain


def test_logit_bias_of_100_forces_a_token_and_logprobs_stay_the_models(llm):
    forced = llm.generate(["def f():"], SamplingParams(max_new_tokens=5, logit_bias={42: 100.0}, logprobs=0))[0]
    assert forced.token_ids == [42] * 5
    unbiased = llm.generate(["def f():"], SamplingParams(max_new_tokens=1, logprobs=1))[0]
    # The reported log-probability of token 42 is the model's, not the biased one (near 0).
    assert forced.logprobs[0].logprob < unbiased.logprobs[0].logprob


@pytest.mark.parametrize("temperature, top_k, top_p, min_p, typical_p", [
    (0.7, 0, 1.0, 0.0, 1.0), (1.0, 50, 1.0, 0.0, 1.0), (0.8, 0, 0.9, 0.0, 1.0), (1.3, 0, 1.0, 0.0, 0.7),
    (0.6, 40, 0.95, 0.0, 0.5), (1.0, 0, 0.8, 0.0, 0.2), (1.0, 0, 1.0, 0.1, 1.0), (1.0, 0, 1.0, 0.5, 0.6),
    (0.9, 0, 0.9, 0.3, 0.6)])
def test_sampling_distribution_equals_hf_warpers(temperature, top_k, top_p, min_p, typical_p):
    """The distribution a sampled token is drawn from equals the one HF's warpers leave
    (temperature, top-k, top-p, min-p, typical-p, in HF's order), on peaked and flat logits, and with
    ties where no top-k or top-p cut runs through them (top-k keeps exactly k tokens where HF keeps
    every token equal to the k-th; among equal logits top-p's order is unspecified in both)."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper)

    from starchat.engine.request import Request
    from starchat.engine.sampler import Sampler

    generator = torch.Generator().manual_seed(7)
    logits = torch.cat([torch.randn(2, 1000, generator=generator) * 3, torch.randn(2, 1000, generator=generator) * 0.3])
    if top_k == 0 and top_p == 1.0:
        logits = torch.cat([logits, torch.randn(1, 1000, generator=generator).round()])  # many equal logits
    warpers = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) \
        + ([TopPLogitsWarper(top_p)] if top_p < 1 else []) + ([MinPLogitsWarper(min_p)] if min_p > 0 else []) \
        + ([TypicalLogitsWarper(typical_p)] if typical_p < 1 else [])
    expected = torch.softmax(LogitsProcessorList(warpers)(None, logits.clone()), dim=-1)

    params = SamplingParams(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            typical_p=typical_p)
    requests = [Request(str(i), [1], params, frozenset(), 16) for i in range(len(logits))]
    probs, candidate_ids = Sampler(eos_token_id=0)._distribution(logits, requests)
    ours = torch.zeros_like(logits).scatter(1, candidate_ids, probs)
    torch.testing.assert_close(ours / ours.sum(dim=-1, keepdim=True), expected, atol=1e-6, rtol=1e-5)


def test_inverse_cdf_draws_each_column_with_its_probability_and_never_a_zero_one():
    from starchat.engine.sampler import inverse_cdf

    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0], [0.0, 0.0, 3.0, 0.0, 1.0, 0.0]])  # unnormalised rows too
    grid = (torch.arange(20000, dtype=torch.float64) / 20000).float()  # evenly spread uniform numbers
    for row in range(2):
        chosen = inverse_cdf(probs[row].expand(len(grid), -1), grid[:, None]).squeeze(1)
        shares = torch.bincount(chosen, minlength=6).double() / len(grid)
        torch.testing.assert_close(shares, (probs[row] / probs[row].sum()).double(), atol=1e-4, rtol=0)
    largest_below_one = torch.tensor([[1.0 - 2.0 ** -24]] * 2)  # where u * total can round up to the total
    assert inverse_cdf(probs, largest_below_one).squeeze(1).tolist() == [4, 4]
    assert inverse_cdf(probs, torch.zeros(2, 1)).squeeze(1).tolist() == [1, 2]


def test_extreme_parameters_sample_their_limit_and_never_fail(llm):
    """A repetition penalty near 0 divides a seen token's positive logit into +inf; a temperature
    near 0 would divide every logit into an infinity. Both used to make NaN probabilities and a
    draw past the vocabulary (a 500 on the server): now +inf logits share the draw, and such
    temperatures decode greedily, as their limit does."""
    prompt = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n"
    seen = set(llm.tokenizer.encode(prompt))
    for seed in range(3):
        penalised = llm.generate([prompt], SamplingParams(do_sample=True, repetition_penalty=1e-30, max_new_tokens=6,
                                                          seed=seed, ignore_eos=True))[0]
        assert len(penalised.token_ids) == 6
        for token in penalised.token_ids:  # each a token seen before (the ones whose logits went to +inf)
            assert token in seen
            seen.add(token)
        seen = set(llm.tokenizer.encode(prompt))
    greedy = llm.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids
    for temperature in (1e-300, 1e-6):
        cold = llm.generate([prompt], SamplingParams(do_sample=True, temperature=temperature, max_new_tokens=8,
                                                     ignore_eos=True, seed=1))[0]
        assert cold.token_ids == greedy
    # A top_p below float32's range is 0 there: the most likely token still stays (it failed an index).
    for top_p, top_k in ((5e-324, 0), (1e-50, 0), (5e-324, 40)):
        narrow = llm.generate([prompt], SamplingParams(do_sample=True, top_p=top_p, top_k=top_k, max_new_tokens=8,
                                                       ignore_eos=True, seed=2))[0]
        assert narrow.token_ids == greedy


def test_infinite_and_nan_logits_draw_among_the_infinite_ones_and_never_nan():
    from starchat.engine.request import Request
    from starchat.engine.sampler import Sampler, inverse_cdf

    logits = torch.randn(3, 50)
    logits[0, [7, 31]] = float("inf")
    logits[1, 5] = float("nan")
    logits[2, :] = float("nan")  # nothing to draw from: still a token of the vocabulary
    drawn = {0: set(), 1: set(), 2: set()}
    for seed in range(40):
        requests = [Request(str(i), [1], SamplingParams(do_sample=True, top_p=[1.0, 0.9, 1.0][i], top_k=[0, 0, 5][i]),
                            frozenset(), 16, generator=torch.Generator().manual_seed(seed)) for i in range(3)]
        for row, token in enumerate(Sampler(eos_token_id=0)(logits, requests).token_ids):
            drawn[row].add(token)
    assert drawn[0] == {7, 31}
    assert 5 not in drawn[1] and len(drawn[1]) > 1
    assert all(0 <= token < 50 for token in drawn[2])
    assert inverse_cdf(torch.full((2, 4), float("nan")), torch.full((2, 1), 0.5)).squeeze(1).tolist() == [3, 3]
    assert 0 <= inverse_cdf(torch.zeros(1, 4), torch.full((1, 1), 0.9)).item() < 4


def test_a_seeded_draw_does_not_depend_on_how_equal_probabilities_happen_to_sort():
    """Rounding that differs between batch shapes reorders equal and near-equal logits; the draw
    follows each token's probability in token-id order, so such a reordering almost never changes
    it (noise assigned by rank, the Gumbel-max draw before, changed 342 of these 400 draws). The
    filters' cuts run between groups of equal logits here: where a cut runs
    through a tie, which tied tokens it keeps depends on the rounding in any sampler."""
    from starchat.engine.request import Request
    from starchat.engine.sampler import Sampler

    generator = torch.Generator().manual_seed(3)
    vocab, groups, group_size = 49152, 8, 6
    logits = (torch.randn(4, vocab, generator=generator) * 2).round() - 4  # thousands of exact ties per row
    group_logits = 6.0 - 0.4 * torch.arange(groups).repeat_interleave(group_size)  # 8 tied groups on top
    for row in logits:
        row[torch.randperm(vocab, generator=generator)[:groups * group_size]] = group_logits
    nudged = logits + torch.randn(logits.shape, generator=generator) * 1e-6  # reorders every tie
    probs = torch.softmax(logits[1], dim=-1)
    group_mass = probs[logits[1] == 6.0 - 0.4 * 2].sum().item()
    top_p = probs[logits[1] >= 6.0 - 0.4 * 2].sum().item() - 0.5 * group_mass / group_size  # cut after group 3
    params = [SamplingParams(do_sample=True, temperature=1.0), SamplingParams(do_sample=True, top_p=top_p),
              SamplingParams(do_sample=True, top_k=4 * group_size, temperature=0.8),
              SamplingParams(do_sample=True, min_p=0.4)]  # groups 1-3 (exp(-0.8) = 0.45 of the first)

    def draw(values, seed):
        requests = [Request(str(i), [1], p, frozenset(), 16, generator=torch.Generator().manual_seed(seed))
                    for i, p in enumerate(params)]
        return Sampler(eos_token_id=0)(values, requests).token_ids

    same = sum(a == b for seed in range(100) for a, b in zip(draw(logits, seed), draw(nudged, seed)))
    assert same >= 398  # of 400 draws


def test_rows_with_different_filters_in_one_batch_get_hfs_distribution_each():
    """A batch mixing rows with and without top-k (whose distribution is then kept over the whole
    vocabulary) gives every row HF's warpers' distribution for its own parameters, as alone."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    from starchat.engine.request import Request
    from starchat.engine.sampler import Sampler

    generator = torch.Generator().manual_seed(9)
    logits = torch.cat([torch.randn(3, 3000, generator=generator) * 3, torch.randn(2, 3000, generator=generator) * 0.5])
    settings = [dict(temperature=0.8, top_k=40, top_p=0.95), dict(temperature=1.0, top_p=0.8), dict(temperature=1.2),
                dict(temperature=0.6, top_k=5, min_p=0.1), dict(temperature=1.0, top_k=300, top_p=0.9)]

    def hf(row, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
        warpers = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) \
            + ([TopPLogitsWarper(top_p)] if top_p < 1 else []) + ([MinPLogitsWarper(min_p)] if min_p else [])
        return torch.softmax(LogitsProcessorList(warpers)(None, logits[row:row + 1].clone()), dim=-1)[0]

    def ours(rows):
        requests = [Request(str(i), [1], SamplingParams(do_sample=True, **settings[i]), frozenset(), 16) for i in rows]
        probs, candidate_ids = Sampler(eos_token_id=0)._distribution(logits[rows], requests)
        assert (candidate_ids.diff(dim=-1) > 0).all()  # token-id order
        full = torch.zeros(len(rows), logits.shape[1]).scatter(1, candidate_ids, probs)
        return full / full.sum(dim=-1, keepdim=True)

    batched = ours(list(range(len(settings))))
    for row in range(len(settings)):
        torch.testing.assert_close(batched[row], hf(row, **settings[row]), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(batched[row], ours([row])[0], atol=1e-7, rtol=1e-6)
