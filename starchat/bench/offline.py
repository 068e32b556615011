"""Offline latency and throughput of our engine, and of HF transformers `generate` as the baseline.

Latency: one request, a short prompt, a fixed number of new tokens (eos ignored): ms/token,
tokens/s, and the achieved weight-read bandwidth (bytes of weights read per token / time).
Throughput: N requests of fixed-length prompts together (ours through the continuous-batching
scheduler, HF as one static batch): output tokens/s end to end, prefill included.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from pathlib import Path
from dataclasses import asdict, dataclass, fields
from typing import Callable, Iterator, TypeVar

import torch

from starchat.bench.lengths import length_drawer
from starchat.bench.machine import synchronize
from starchat.engine.engine import LLMEngine
from starchat.llm import LLM
from starchat.sampling_params import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LatencyResult:
    ms_per_token: float
    tokens_per_s: float
    ttft_ms: float  # time to first token of a prompt of prompt_len tokens
    weight_bytes_per_token: int
    achieved_gb_per_s: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ThroughputResult:
    num_prompts: int
    output_tokens_per_s: float
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


Result = TypeVar("Result")


def interleave(measurements: dict[str, Callable[[], Result]], rounds: int) -> dict[str, list[Result]]:
    """Each side measured once per round, the sides in turn. A shared host's speed drifts by 10-20%
    over minutes; measuring one side after the other for minutes each put that drift into their
    ratio, while in turns it falls on every side alike and each round's ratio compares like with
    like."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    results: dict[str, list[Result]] = {name: [] for name in measurements}
    for _ in range(rounds):
        for name, measure in measurements.items():
            results[name].append(measure())
    return results


def whole_sequence_latency(greedy: Callable[[list[int], int], object], new_tokens: int, prompt_len: int,
                           weight_bytes: int, repeats: int = 3, device: torch.device = torch.device("cpu")) -> LatencyResult:
    """Batch-1 figures of a side that generates whole sequences (`greedy(prompt_ids, count)`):
    ms/token from the difference between new_tokens + 1 tokens and 1 (so prefill and the first
    token cancel out), time to first token from one token after a prompt_len-token prompt;
    medians of `repeats`, the device synchronized around each."""
    short, long = random_prompts(1, 8)[0], random_prompts(1, prompt_len, seed=1)[0]
    greedy(short, 8)  # warm-up
    one = _median_time(lambda: greedy(short, 1), device, repeats)
    many = _median_time(lambda: greedy(short, new_tokens + 1), device, repeats)
    ttft = _median_time(lambda: greedy(long, 1), device, repeats)
    per_token = (many - one) / new_tokens
    return LatencyResult(1e3 * per_token, 1 / per_token, 1e3 * ttft, weight_bytes, weight_bytes / per_token / 1e9)


def median_latency(rounds: list[LatencyResult]) -> LatencyResult:
    """Each figure's median over the rounds."""
    medians = {field.name: statistics.median(getattr(result, field.name) for result in rounds)
               for field in fields(LatencyResult)}
    medians["weight_bytes_per_token"] = int(medians["weight_bytes_per_token"])
    return LatencyResult(**medians)


def round_ratios(mine: list[float], theirs: list[float]) -> list[float]:
    """mine / theirs for each round (both measured in that round)."""
    if len(mine) != len(theirs) or not mine:
        raise ValueError("round_ratios needs the same number of rounds on both sides, at least one")
    return [a / b for a, b in zip(mine, theirs)]


@dataclass
class MethodTimings:
    """Seconds spent in, and calls of, each timed method (see `timed_methods`)."""

    seconds: dict[str, float]
    calls: dict[str, int]

    def reset(self) -> None:
        for label in self.seconds:
            self.seconds[label], self.calls[label] = 0.0, 0


@contextlib.contextmanager
def timed_methods(targets: dict[str, tuple[object, str]]) -> Iterator[MethodTimings]:
    """Times every call of `owner.name` for each `label: (owner, name)` while the block runs (the
    instance attribute wraps the method), and puts the originals back afterwards."""
    timings = MethodTimings({label: 0.0 for label in targets}, {label: 0 for label in targets})
    originals = []
    for label, (owner, name) in targets.items():
        own = name in vars(owner)  # an instance attribute (or a cached ctypes function) to restore
        inner = getattr(owner, name)
        originals.append((owner, name, inner if own else None))

        def wrapper(*arguments, _inner=inner, _label=label, **keywords):
            start = time.perf_counter()
            try:
                return _inner(*arguments, **keywords)
            finally:
                timings.seconds[_label] += time.perf_counter() - start
                timings.calls[_label] += 1
        setattr(owner, name, wrapper)
    try:
        yield timings
    finally:
        for owner, name, original in reversed(originals):
            if original is None:
                delattr(owner, name)  # the class's method shows through again
            else:
                setattr(owner, name, original)


@contextlib.contextmanager
def host_step_timers(engine) -> Iterator[dict[str, float]]:
    """Host-only work of the engine's steps: scheduling and output processing (detokenizing, stop
    strings, deltas). On a GPU nothing overlaps them, so the GPU idles for that long every step.
    Yields a dict filled when the block ends: steps, and milliseconds per step of `step`,
    `schedule`, `outputs`; and the decode-only steps (no prompt chunk in them): their count,
    their tokens and `decode_tokens_per_s`, the rate of the decode phase alone. That rate is what
    fixed-batch decode loops report, and what a server sustains between prompts; an end-to-end
    rate also pays for every prompt's prefill."""
    figures: dict[str, float] = {}
    targets = {"step": (engine, "step"), "schedule": (engine.scheduler, "schedule"), "outputs": (engine, "_process_outputs")}
    decode = {"steps": 0, "tokens": 0, "seconds": 0.0}
    with timed_methods(targets) as timings:
        timed_schedule, timed_step = engine.scheduler.schedule, engine.step
        scheduled = []

        def schedule():
            scheduled.append(timed_schedule())
            return scheduled[-1]

        def step():
            scheduled.clear()
            start = time.perf_counter()
            deltas = timed_step()
            elapsed = time.perf_counter() - start
            if scheduled and scheduled[-1].decodes and not scheduled[-1].prefills:
                decode["steps"] += 1
                decode["tokens"] += len(scheduled[-1].decodes)
                decode["seconds"] += elapsed
            return deltas

        engine.scheduler.schedule, engine.step = schedule, step
        try:
            yield figures
        finally:
            engine.scheduler.schedule, engine.step = timed_schedule, timed_step
    steps = timings.calls["step"]
    figures["steps"] = steps
    figures.update({f"{label}_ms": 1e3 * value / max(steps, 1) for label, value in timings.seconds.items()})
    figures["decode_steps"] = decode["steps"]
    figures["decode_tokens"] = decode["tokens"]
    figures["decode_tokens_per_s"] = decode["tokens"] / decode["seconds"] if decode["seconds"] else 0.0


def random_prompts(count: int, length: int, seed: int = 0, vocab: int = 49152) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(19, vocab, (count, length), generator=generator).tolist()  # no special tokens


def concurrent_workload(num_prompts: int, prompt_len: int, new_tokens: int, range_ratio: float = 0.0,
                        seed: int = 2) -> tuple[list[list[int]], list[int]]:
    """The prompts and new-token counts of a concurrent run: every prompt prompt_len tokens and
    every request new_tokens with range_ratio 0, else each length drawn uniformly from
    len x [1 - range_ratio, 1 + range_ratio] (lengths.length_drawer). The same for every engine
    measured with the same arguments."""
    if not range_ratio:
        return random_prompts(num_prompts, prompt_len, seed=seed), [new_tokens] * num_prompts
    draw = length_drawer(random.Random(seed), range_ratio)
    lengths = [(draw(prompt_len), draw(new_tokens)) for _ in range(num_prompts)]
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(19, 49152, (length,), generator=generator).tolist() for length, _ in lengths]
    return prompts, [count for _, count in lengths]


def weight_bytes_read_per_token(model: torch.nn.Module) -> int:
    """Every parameter is read once per decoded token, except the embedding tables (one row each;
    a table tied to the lm_head is counted once, as the lm_head, whether packed or not)."""
    total = 0
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if name.endswith(("wte.weight", "wpe.weight", "wte.packed_weight")):
            continue
        total += parameter.numel() * parameter.element_size()
    return total


def _median_time(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours_latency(llm: LLM, new_tokens: int, prompt_len: int, repeats: int = 3) -> LatencyResult:
    def greedy(prompt: list[int], count: int):
        return llm.generate([prompt], SamplingParams(max_new_tokens=count, ignore_eos=True))

    return whole_sequence_latency(greedy, new_tokens, prompt_len, weight_bytes_read_per_token(llm.engine.runner.model),
                                  repeats, llm.engine.device)


def ours_throughput(llm: LLM, num_prompts: int, prompt_len: int, new_tokens: int,
                    range_ratio: float = 0.0) -> ThroughputResult:
    prompts, counts = concurrent_workload(num_prompts, prompt_len, new_tokens, range_ratio)
    llm.generate(prompts[:2], SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
    params = [SamplingParams(max_new_tokens=count, ignore_eos=True) for count in counts]
    seconds = _median_time(lambda: llm.generate(prompts, params), llm.engine.device, 1)
    return ThroughputResult(num_prompts, sum(counts) / seconds, seconds)


def check_hf_readable(model_dir) -> None:
    """Raise for a folder HF transformers cannot load as a GPTBigCode checkpoint: one written by
    `starchat quantize` or `starchat pack`."""
    from starchat.model.packed_checkpoint import checkpoint_packing
    from starchat.model.quantized_checkpoint import checkpoint_quantization

    if checkpoint_quantization(Path(model_dir)) or checkpoint_packing(Path(model_dir)) is not None:
        raise ValueError(f"{model_dir}: written by `starchat quantize` or `starchat pack`, which HF transformers cannot "
                         "read; measure the HF baseline on the float checkpoint it came from")


class HFBaseline:
    """HF transformers' GPTBigCodeForCausalLM.generate on the same checkpoint (greedy, fixed length)."""

    def __init__(self, model_dir, dtype: str, device: str, model: torch.nn.Module | None = None):
        """`model`: an already built HF model (e.g. random weights drawn on a GPU) instead of loading model_dir."""
        from transformers import GPTBigCodeForCausalLM

        self.device = torch.device(device)
        if model is None:
            check_hf_readable(model_dir)
            model = GPTBigCodeForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
        self.model = model.eval().to(self.device)

    def generate(self, prompts: list[list[int]], new_tokens: int):
        input_ids = torch.tensor(prompts, device=self.device)
        with torch.inference_mode():
            return self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                                       pad_token_id=0)

    def latency(self, new_tokens: int, prompt_len: int, repeats: int = 3) -> LatencyResult:
        return whole_sequence_latency(lambda prompt, count: self.generate([prompt], count), new_tokens, prompt_len,
                                      weight_bytes_read_per_token(self.model), repeats, self.device)

    def throughput(self, num_prompts: int, prompt_len: int, new_tokens: int) -> ThroughputResult:
        prompts = random_prompts(num_prompts, prompt_len, seed=2)
        self.generate(prompts[:2], 4)
        seconds = _median_time(lambda: self.generate(prompts, new_tokens), self.device, 1)
        return ThroughputResult(num_prompts, num_prompts * new_tokens / seconds, seconds)


@dataclass
class RequestTiming:
    prompt_tokens: int
    cached_tokens: int
    time_to_first_token: float  # seconds
    total: float  # seconds, until the last token


def run_requests(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[list[RequestTiming], list[list[int]]]:
    """Submit `prompts` at once, step until all finish; their timings and generated tokens."""
    start = time.perf_counter()
    ids = [engine.add_request(prompt, params) for prompt in prompts]
    first: dict[str, float] = {}
    done: dict[str, tuple[float, int]] = {}
    tokens: dict[str, list[int]] = {request_id: [] for request_id in ids}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            now = time.perf_counter() - start
            if delta.token_ids:
                first.setdefault(delta.request_id, now)
                tokens[delta.request_id].extend(delta.token_ids)
            if delta.finished:
                done[delta.request_id] = (now, delta.num_cached_tokens)
    timings = [RequestTiming(len(prompt), done[request_id][1], first[request_id], done[request_id][0])
               for request_id, prompt in zip(ids, prompts)]
    return timings, [tokens[request_id] for request_id in ids]
