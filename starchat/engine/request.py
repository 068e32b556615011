"""One generation request as the engine tracks it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import torch

from starchat.outputs import TokenLogprob
from starchat.sampling_params import SamplingParams

if TYPE_CHECKING:
    from starchat.engine.guided import GrammarState


class RequestStatus(Enum):
    WAITING = "waiting"  # not in the running batch (new, or preempted and to be recomputed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """There is no prefill or decode phase: only how many of the sequence's tokens are cached.

    A request needs `num_tokens - num_computed_tokens` tokens computed; when that reaches the
    end of its sequence, the step samples its next token. A preempted request drops its cache
    (num_computed_tokens = 0) and recomputes prompt + output when it is admitted again.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]  # eos and the caller's stop ids (unless ignore_eos)
    max_total_tokens: int  # prompt + output may not exceed this (the context length)
    generator: torch.Generator | None = None  # per request, so a seed gives the same text in any batch
    seed: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    # Prefix caching (kv_cache.py): hashes of the sequence's full blocks so far (they depend on
    # the tokens only, so they outlive a preemption), how many of block_ids are registered, and
    # the prompt tokens found cached when the request was first admitted.
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    num_cached_tokens: int | None = None
    # Speculative decoding: tokens guessed to follow, verified by the step scheduled with them.
    draft_token_ids: list[int] = field(default_factory=list)
    draft_misses: int = 0  # verify steps in a row that accepted no draft
    drafts_resume_at: int = 0  # no drafts before the sequence has this many tokens (backing off after misses)
    # Structured output: where the output stands in its grammar (engine/guided.py); None = free text
    grammar: "GrammarState | None" = None
    # (The sampler reads a row's grammar mask after `drafts_before`: none for a request itself;
    # speculative.DraftRow has them.)
    drafts_before = ()

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, position: int) -> int:
        prompt_len = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < prompt_len else self.output_token_ids[position - prompt_len]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
