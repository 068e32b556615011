"""Speculative decoding with drafts looked up in the sequence itself (n-gram / prompt lookup).

Code assistants repeat what they have read: an edited function copies most of the original, a
test reuses the names of the code under test, a loop body echoes the one before. When the last
few tokens of a sequence occurred earlier in it, the tokens that followed that occurrence are a
cheap guess of what comes next. One step then computes the last token and the guesses together
(a memory-bound decode step reads the weights once whatever the row count), and keeps the
guesses that greedy decoding confirms plus the model's own next token, so a step yields 1 to
k + 1 tokens, exactly those that one-token-at-a-time greedy decoding gives. Sampling requests
keep each guess with the probability the model gives it (`Sampler.verify`), so their tokens are
distributed as without guesses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from starchat.engine.guided import GrammarState
from starchat.engine.request import Request
from starchat.sampling_params import SamplingParams


def propose_drafts(tokens: list[int], num_drafts: int, max_ngram: int = 3, min_ngram: int = 2) -> list[int]:
    """Up to `num_drafts` tokens that followed the latest earlier occurrence of the sequence's
    last n tokens (n = max_ngram down to min_ngram: the longest match wins); [] when none
    occurred. (A single matching token is weak evidence: measured, its drafts were mostly
    rejected, and a rejected draft costs a verify step.)"""
    if num_drafts <= 0 or len(tokens) < min_ngram + 1:
        return []
    sequence = np.asarray(tokens)
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        pattern = sequence[-n:]
        # Starts of earlier occurrences, each followed by at least one token before the suffix itself.
        candidates = np.flatnonzero(sequence[:-n] == pattern[0])
        for offset in range(1, n):
            candidates = candidates[sequence[candidates + offset] == pattern[offset]]
        if candidates.size:
            start = int(candidates[-1]) + n
            return sequence[start:start + num_drafts].tolist()
    return []


def can_speculate(request: Request) -> bool:
    """Every request but a seeded sampling one (verification draws its own random numbers to
    accept or reject drafts, so a seed would no longer give the tokens it gives without drafts)."""
    return request.params.greedy or request.params.seed is None


def grammar_drafts(request: Request, drafts: list[int]) -> list[int]:
    """The drafts a structured-output request's grammar allows from its position on (the first
    it bans would be rejected by the row's mask, and the rows after it are never reached)."""
    return drafts if request.grammar is None else drafts[:request.grammar.valid_prefix(drafts)]


@dataclass
class DraftRow:
    """A speculative decode at one of its verified rows: the request as if the drafts before the
    row were accepted (the sampler's penalties and min_new_tokens read these fields)."""

    params: SamplingParams
    stop_token_ids: frozenset[int]
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    next_draft: int  # the draft this row's distribution verifies; -1 after the last
    grammar: "GrammarState | None"  # a structured-output request's, where it stands before the drafts
    drafts_before: list[int]  # the drafts before this row: its grammar mask is the one after them

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids


def draft_rows(request: Request, drafts: list[int]) -> list[DraftRow]:
    return [DraftRow(request.params, request.stop_token_ids, request.prompt_token_ids,
                     request.output_token_ids + drafts[:i], drafts[i] if i < len(drafts) else -1,
                     request.grammar, drafts[:i])
            for i in range(len(drafts) + 1)]


def accepted_tokens(drafts: list[int], targets: list[int]) -> list[int]:
    """The tokens a verified step yields: the drafts that equal the model's greedy choice at their
    position, then the model's choice after the last of them. targets[i] is the argmax after
    drafts[:i] (len(targets) = len(drafts) + 1)."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return drafts[:accepted] + [targets[accepted]]
