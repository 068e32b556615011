"""What prefix caching saves: a multi-turn chat, and requests that share a system prompt.

Both scenarios drive an `LLMEngine` step by step (the scheduler, chunked prefill and the cache as
the server runs them) and time each request from `add_request` to its first token and to its
end. Prompts are token ids, so that nothing but the engine is timed.

- chat: each turn's prompt is the previous prompt, the model's reply to it and a new user
  message, as a chat client re-sends the conversation every turn. Each engine continues its own
  replies (greedy), so both engines see prompts of the same lengths.
- shared prefix: `requests` prompts made of one system prompt and a question each arrive at
  once; `warm`: after one request with the system prompt alone (untimed, earlier traffic), else
  into a cache that has never seen it (the first admitted request computes it for the others).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

from starchat.bench.offline import RequestTiming, run_requests
from starchat.engine.engine import LLMEngine
from starchat.sampling_params import SamplingParams


@dataclass
class ScenarioResult:
    requests: list[RequestTiming] = field(default_factory=list)
    wall: float = 0.0  # seconds for the whole scenario

    @property
    def mean_time_to_first_token(self) -> float:
        return statistics.fmean(r.time_to_first_token for r in self.requests)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.requests)

    @property
    def cached_tokens(self) -> int:
        return sum(r.cached_tokens for r in self.requests)

    def summary(self) -> dict:
        return {"wall_s": self.wall, "mean_time_to_first_token_s": self.mean_time_to_first_token,
                "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "requests": [asdict(r) for r in self.requests]}


def chat(engine: LLMEngine, system: list[int], user_turns: list[list[int]], reply_tokens: int) -> ScenarioResult:
    params = SamplingParams(max_new_tokens=reply_tokens, ignore_eos=True)
    result = ScenarioResult()
    conversation = list(system)
    start = time.perf_counter()
    for user in user_turns:
        conversation += user
        (timing,), (reply,) = run_requests(engine, [conversation], params)
        result.requests.append(timing)
        conversation = conversation + reply
    result.wall = time.perf_counter() - start
    return result


def shared_prefix(engine: LLMEngine, system: list[int], questions: list[list[int]], reply_tokens: int,
                  warm: bool = True) -> ScenarioResult:
    params = SamplingParams(max_new_tokens=reply_tokens, ignore_eos=True)
    if warm:
        run_requests(engine, [system], SamplingParams(max_new_tokens=1, ignore_eos=True))  # earlier traffic
    start = time.perf_counter()
    timings, _ = run_requests(engine, [system + question for question in questions], params)
    return ScenarioResult(timings, time.perf_counter() - start)
