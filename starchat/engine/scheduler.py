"""Iteration-level scheduling: which requests compute how many tokens in the next step.

Each step has a token budget. Running decodes come first (one token each, so no stream stalls),
then prompt chunks of running requests, then newly admitted requests, each chunk cut to what
the budget has left: a long prompt is prefilled over several steps while the others keep
decoding. Admission takes cache blocks only for the chunk it computes; when a decode cannot
get a block, the newest running request is preempted (its blocks freed, to be recomputed).
With prefix caching, an admitted request first takes the cached blocks of its longest cached
prefix (kv_cache.py) and computes only the rest. Blocks are registered when they are scheduled to
be filled, so a request admitted later in the same step finds them too: in every layer the step
writes all its new keys and values before any prompt chunk attends (attention.py), and a chunk
after cached tokens reads them from the cache. (If the step fails, `forget_scheduled_blocks`
drops the registrations.)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from starchat.engine.kv_cache import BlockAllocator, block_hashes
from starchat.engine.request import Request, RequestStatus
from starchat.engine.speculative import can_speculate, grammar_drafts, propose_drafts


@dataclass
class ScheduledBatch:
    decodes: list[Request] = field(default_factory=list)  # one new token each
    prefills: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens this step)
    # Decodes with drafts (request.draft_token_ids): their last token and drafts are computed together
    speculative: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills and not self.speculative

    @property
    def num_tokens(self) -> int:
        return (len(self.decodes) + sum(n for _, n in self.prefills)
                + sum(1 + len(r.draft_token_ids) for r in self.speculative))


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int,
                 prefix_caching: bool = False, num_speculative_tokens: int = 0, speculative_max_running: int = 4):
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max(max_num_batched_tokens, max_num_seqs)
        self.prefix_caching = prefix_caching
        self.num_speculative_tokens = num_speculative_tokens
        self.speculative_max_running = speculative_max_running
        self.num_draft_tokens = 0  # drafted and verified so far
        self.num_accepted_tokens = 0  # of those, accepted
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # Tokens of admitted requests looked up in the prefix cache, and those found there.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, request: Request) -> None:
        """Take a finished or cancelled request out and free its cache blocks at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.allocator.release(request.block_ids)
        request.num_registered_blocks = 0

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens

        # 1. Decodes of running requests, oldest first; preempt the newest when blocks run out.
        speculate = self.num_speculative_tokens > 0 and len(self.running) <= self.speculative_max_running
        index = 0
        while index < len(self.running):
            request = self.running[index]
            if request.num_pending_tokens != 1:
                index += 1
                continue
            if speculate and self._schedule_drafts(request, budget):
                batch.speculative.append(request)
                self._register_blocks(request, request.num_tokens)  # verified tokens only, not the drafts
                budget -= 1 + len(request.draft_token_ids)
                index += 1
                continue
            while not self.allocator.grow(request.block_ids, request.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is request:
                    break
            else:
                batch.decodes.append(request)
                self._register_blocks(request, request.num_tokens)
                budget -= 1
                index += 1
                continue
            # `request` itself was preempted: the list shrank, index now points past the end.

        # 2. Unfinished prompt chunks of running requests.
        for request in self.running:
            if budget <= 0:
                break
            if request.num_pending_tokens > 1:
                chunk = min(request.num_pending_tokens, budget)
                if not self.allocator.grow(request.block_ids, request.num_computed_tokens + chunk):
                    break
                batch.prefills.append((request, chunk))
                self._register_blocks(request, request.num_computed_tokens + chunk)
                budget -= chunk

        # 3. Admit waiting requests while budget, batch slots and cache blocks allow.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]  # new or preempted: nothing computed, no blocks
            # (a request for prompt log-probabilities computes, and so scores, every position)
            look_up = self.prefix_caching and request.params.prompt_logprobs is None
            if look_up:
                self._take_cached_prefix(request)
            chunk = min(request.num_pending_tokens, budget)
            if not self.allocator.grow(request.block_ids, request.num_computed_tokens + chunk):
                self._drop_blocks(request)
                break
            if look_up:
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += request.num_computed_tokens
                if request.num_cached_tokens is None:
                    request.num_cached_tokens = min(request.num_computed_tokens, len(request.prompt_token_ids))
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.prefills.append((request, chunk))
            self._register_blocks(request, request.num_computed_tokens + chunk)
            budget -= chunk
        return batch

    def _schedule_drafts(self, request: Request, budget: int) -> bool:
        """Draft tokens for a decode, and cache slots for them; False: decode it plainly."""
        if not can_speculate(request) or request.num_tokens < request.drafts_resume_at:
            return False
        room = min(self.num_speculative_tokens, budget - 1,
                   request.params.max_new_tokens - len(request.output_token_ids) - 1,  # the step adds one more
                   request.max_total_tokens - request.num_tokens - 1)
        drafts = grammar_drafts(request, propose_drafts(request.all_token_ids, room)) if room > 0 else []
        if not drafts or not self.allocator.grow(request.block_ids, request.num_tokens + len(drafts)):
            return False
        request.draft_token_ids = drafts
        return True

    def record_verified(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        """After a speculative step: count, and free the blocks only rejected drafts reached."""
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        # A verify step costs more than a plain one (it computes every draft's row; about 1.1x in
        # the CPU's native step): after steps that accept nothing, stop drafting for this request
        # for 2, 4, then 8 tokens.
        request.draft_misses = 0 if num_accepted else request.draft_misses + 1
        if request.draft_misses:
            request.drafts_resume_at = request.num_tokens + 2 ** min(request.draft_misses, 3)
        keep = self.allocator.blocks_needed(request.num_tokens)
        if not request.finished and len(request.block_ids) > keep:
            surplus = request.block_ids[keep:]
            del request.block_ids[keep:]
            self.allocator.release(surplus)

    def _take_cached_prefix(self, request: Request) -> None:
        # At most num_tokens - 1 tokens come from the cache: the last one is computed to get the
        # logits of the next, and whole blocks only, so no cached block is ever written to.
        size = self.allocator.block_size
        hashes = block_hashes(request.block_hashes, request.token_at, size, (request.num_tokens - 1) // size)
        request.block_ids = self.allocator.take_cached(hashes)
        request.num_registered_blocks = len(request.block_ids)
        request.num_computed_tokens = len(request.block_ids) * size

    def _register_blocks(self, request: Request, computed_after_step: int) -> None:
        """Offer the blocks this step fills to later requests (this step's included)."""
        full = computed_after_step // self.allocator.block_size
        if not self.prefix_caching or full <= request.num_registered_blocks:
            return
        hashes = block_hashes(request.block_hashes, request.token_at, self.allocator.block_size, full)
        for index in range(request.num_registered_blocks, full):
            self.allocator.register(request.block_ids[index], hashes[index])
        request.num_registered_blocks = full

    def forget_scheduled_blocks(self) -> None:
        """After a failed step: its blocks may hold anything, and which blocks were registered
        before it does not matter enough to track, so no registered block is offered any more."""
        self.allocator.forget_cached()

    def _drop_blocks(self, request: Request) -> None:
        self.allocator.release(request.block_ids)
        request.num_computed_tokens = 0
        request.num_registered_blocks = 0

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._drop_blocks(request)
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1
