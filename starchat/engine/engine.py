"""The synchronous engine: add requests, call `step()` until done, read the deltas.

One step: `scheduler.schedule()` -> `runner.launch()` -> its `result()` -> `_record_tokens()` and,
for speculative decodes, `_record_verified()` (what the next schedule needs) -> `_process_outputs()`
(text and deltas). On a GPU the last one runs for
the previous step's tokens while this step's kernels run (`overlap_host_work`).
Both the offline `LLM` and the server's `AsyncLLM` drive this class; neither touches the
model or the cache.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from dataclasses import dataclass, field

import torch

from starchat.chat_template import END_TOKEN, ChatTemplate, resolve_system_prompt
from starchat.config import EngineConfig, ModelConfig
from starchat.engine.devices import (default_batched_tokens, default_kv_cache_bytes, profile_step_bytes, resolve_device,
                                     resolve_dtype)
from starchat.engine.kv_cache import BlockAllocator, kv_bytes_per_token
from starchat.engine.guided import GrammarCompiler
from starchat.engine.request import Request, RequestStatus
from starchat.engine.runner import ModelRunner
from starchat.errors import FieldError
from starchat.engine.scheduler import Scheduler
from starchat.model.loader import load_model, resolve_model_dir
from starchat.model.quantized_checkpoint import checkpoint_quantization
from starchat.outputs import FinishReason, StreamDelta, TokenLogprob
from starchat.sampling_params import SamplingParams, SamplingParamsError
from starchat.tokenizer import REPLACEMENT_CHARACTER, IncrementalDetokenizer, StopStringMatcher, Tokenizer

logger = logging.getLogger("starchat.engine")


class RequestError(FieldError):
    """A request the engine cannot take; `field` names the input at fault."""



@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_used_blocks: int
    kv_cache_total_blocks: int
    num_preemptions: int
    prefix_cache_queries: int = 0  # tokens of admitted requests looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found there (not computed again)
    spec_decode_draft_tokens: int = 0  # speculative decoding: tokens drafted and verified
    spec_decode_accepted_tokens: int = 0  # of those, accepted

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_cache_used_blocks / max(1, self.kv_cache_total_blocks)


@dataclass(eq=False)
class _Tracked:
    """Engine-side state of a request's text: detokenizer and stop-string matcher."""

    request: Request
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    # Prompt log-probabilities by position (when asked for), and whether a delta has carried them
    prompt_logprobs: dict[int, tuple[float, list[tuple[int, float]]]] = field(default_factory=dict)
    prompt_logprobs_sent: bool = False


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, progress: bool = True):
        config = config or EngineConfig()
        self.config = config
        self.model_dir = resolve_model_dir(config.model, config.revision)
        self.model_name = config.model or self.model_dir.name
        self.device = resolve_device(config.device)
        self.model_config = ModelConfig.from_file(self.model_dir / "config.json")
        # int8 weights either way: quantized while loading, or stored so (`starchat quantize`)
        self.quantize = config.quantize or checkpoint_quantization(self.model_dir)
        self.dtype = resolve_dtype(config.dtype, self.device, self.quantize, self.model_config.torch_dtype)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.tokenizer.cover_model_vocabulary(self.model_config.vocab_size)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size)
        self.chat_template = ChatTemplate.from_model_dir(self.model_dir)
        self.end_token_id = self.tokenizer.token_id(END_TOKEN)
        model = load_model(self.model_dir, self.dtype, self.device, progress=progress, quantize=config.quantize,
                           load_format=config.load_format)

        per_token = kv_bytes_per_token(self.model_config, self.dtype)
        self.max_num_batched_tokens = config.max_num_batched_tokens or default_batched_tokens(self.device)
        budget = config.kv_cache_memory_bytes
        if not budget:
            # On a GPU, the cache takes what is left once the largest step has room to run.
            step_tokens = max(self.max_num_batched_tokens, config.max_num_seqs)  # as the scheduler counts
            step_bytes = profile_step_bytes(model, step_tokens, config.max_num_seqs, self.dtype, self.device)
            budget = default_kv_cache_bytes(self.device, per_token, self.model_config.n_positions, config.max_num_seqs,
                                            step_bytes)
        num_blocks = max(1, budget // (per_token * config.kv_block_size))
        capacity_tokens = num_blocks * config.kv_block_size
        self.max_model_len = min(config.max_model_len or self.model_config.n_positions, self.model_config.n_positions)
        if capacity_tokens < self.max_model_len:
            logger.warning("KV-cache budget holds %d tokens, less than the context (%d): the context is cut to fit",
                           capacity_tokens, self.max_model_len)
            self.max_model_len = capacity_tokens
        self.kv_cache_memory_bytes = num_blocks * config.kv_block_size * per_token
        self.runner = ModelRunner(model, num_blocks, config.kv_block_size, self.dtype, self.device, self.tokenizer.eos_token_id,
                                  progress=progress)
        if self.device.type == "cuda" and config.cuda_graphs:
            # A speculative step has a row per verified position of each request.
            verify_rows = config.speculative_max_running * (1 + config.num_speculative_tokens) if config.num_speculative_tokens else 0
            self.runner.enable_static_decode(max(config.max_num_seqs, verify_rows), self.max_model_len)
        self.scheduler = Scheduler(BlockAllocator(num_blocks, config.kv_block_size), config.max_num_seqs,
                                   self.max_num_batched_tokens, prefix_caching=config.enable_prefix_caching,
                                   num_speculative_tokens=config.num_speculative_tokens,
                                   speculative_max_running=config.speculative_max_running)
        self._tracked: dict[str, _Tracked] = {}
        # Tokens recorded but not yet turned into deltas, and deltas made but not yet handed out.
        self._pending: list[tuple[_Tracked, int, object, str | None, bool]] = []
        self._ready: list[StreamDelta] = []
        # On a GPU a step's kernels run while the host detokenizes the previous step's tokens;
        # on a CPU the same cores do both, so deltas come out in the step that made them.
        overlap = config.overlap_host_work
        self.overlap_host_work = self.device.type == "cuda" if overlap is None else overlap

    # ---- requests -------------------------------------------------------------------------

    def chat_request(self, messages: list[dict], params: SamplingParams | None = None,
                     system: str | None = None) -> tuple[str, SamplingParams]:
        """The StarChat prompt for `messages` and params that stop at the end of the assistant turn."""
        prompt = self.chat_prompt(messages, system)
        params = (params or SamplingParams()).copy()
        if self.end_token_id is not None and self.end_token_id not in params.stop_token_ids:
            params.stop_token_ids.append(self.end_token_id)
        return prompt, params

    def chat_prompt(self, messages: list[dict], system: str | None = None, add_generation_prompt: bool = True) -> str:
        """`messages` in the model's dialogue format (`system`: a named system prompt or its text)."""
        return self.chat_template.render(messages, system=resolve_system_prompt(system),
                                         add_generation_prompt=add_generation_prompt)

    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:  # JSON allows lone surrogates ("\ud800"); text cannot hold them
                raise RequestError("prompt", "is not valid Unicode text (it holds a lone surrogate)") from None
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.model_config.vocab_size
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise RequestError("prompt", f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
            token_ids = list(prompt)
        else:
            raise RequestError("prompt", "must be a string or a list of token ids")
        if not token_ids:
            raise RequestError("prompt", "is empty; give at least one token of text")
        return token_ids

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError/SamplingParamsError naming the field when the request cannot run."""
        params.validate()
        vocab = self.model_config.vocab_size
        bad_stop = next((t for t in params.stop_token_ids if not 0 <= t < vocab), None)
        if bad_stop is not None:
            raise SamplingParamsError("stop_token_ids", f"token id {bad_stop} is outside the vocabulary (0..{vocab - 1})")
        bad_bias = next((t for t in params.logit_bias if not 0 <= t < vocab), None)
        if bad_bias is not None:
            raise SamplingParamsError("logit_bias", f"token id {bad_bias} is outside the vocabulary (0..{vocab - 1})")
        if params.guided is not None:
            self.grammars.compile(params.guided)  # SamplingParamsError("guided") when it does not compile
        prompt_len = len(prompt_token_ids)
        if prompt_len >= self.max_model_len:
            raise RequestError("prompt", f"{prompt_len} tokens do not fit the context of {self.max_model_len} tokens "
                                         "(leave room for at least one new token); shorten the prompt")
        room = self.max_model_len - prompt_len
        if params.max_new_tokens > room:
            raise SamplingParamsError("max_new_tokens", f"{params.max_new_tokens} new tokens do not fit: the prompt has "
                                                        f"{prompt_len} tokens and the context holds {self.max_model_len}, "
                                                        f"so at most {room}")

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None) -> str:
        params = params or SamplingParams()
        prompt_token_ids = self.tokenize_prompt(prompt)
        self.check_request(prompt_token_ids, params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._tracked:
            raise RequestError("request_id", f"{request_id} is already running")
        grammar = self.grammars.compile(params.guided) if params.guided is not None else None
        seed = generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            generator = torch.Generator(device=self.device).manual_seed(seed)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.add(self.tokenizer.eos_token_id)
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            params=params,
            stop_token_ids=frozenset(stop_ids),
            max_total_tokens=self.max_model_len,
            generator=generator,
            seed=seed,
            grammar=grammar,
        )
        self._tracked[request_id] = _Tracked(
            request,
            IncrementalDetokenizer(self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens),
            StopStringMatcher(params.stop),
        )
        self.scheduler.add(request)
        return request_id

    def abort_request(self, request_id: str) -> StreamDelta | None:
        """Cancel a request and free its cache blocks now; its last delta says `abort`."""
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return None
        self._ready = [delta for delta in self._ready if delta.request_id != request_id]  # nothing after the abort
        request = tracked.request
        self.scheduler.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = FinishReason.ABORT.value
        return self._delta(request, "", [], None)

    def request_ids(self) -> list[str]:
        """Ids of every request not finished yet (waiting or running)."""
        return list(self._tracked)

    def has_unfinished_requests(self) -> bool:
        """True while a request runs or waits, or deltas are still to be handed out."""
        return self.scheduler.has_unfinished() or bool(self._pending or self._ready)

    def stats(self) -> EngineStats:
        allocator = self.scheduler.allocator
        scheduler = self.scheduler
        return EngineStats(len(scheduler.running), len(scheduler.waiting), allocator.num_used_blocks,
                           allocator.num_blocks, scheduler.num_preemptions, scheduler.prefix_cache_queries,
                           scheduler.prefix_cache_hits, scheduler.num_draft_tokens, scheduler.num_accepted_tokens)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[StreamDelta]:
        """Run one step; return the deltas ready now. With host work overlapped (on a GPU), those
        are the previous step's: their text is made while the GPU computes this step."""
        deltas, self._ready = self._ready, []
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return deltas + self._process_outputs()
        try:
            launched = self.runner.launch(batch)
        except BaseException:
            self._step_failed(batch)
            raise
        if self.overlap_host_work:
            deltas += self._process_outputs()
        try:
            sampling, sampler_output = launched.result()
        except BaseException:
            self._step_failed(batch)
            self._ready = deltas  # made already: the next step hands them out
            raise
        for request, length in batch.prefills:
            request.num_computed_tokens += length
        for request in batch.decodes:
            request.num_computed_tokens += 1
        for scores in launched.prompt_scores:
            by_position = self._tracked[scores.request.request_id].prompt_logprobs
            for position, logprob, alternatives in scores.result():
                by_position.setdefault(position, (logprob, alternatives))  # a recomputed prompt: the first
        if sampler_output is not None:
            self._record_tokens(sampling, sampler_output)
        self._record_verified(launched)
        if not self.overlap_host_work:
            deltas += self._process_outputs()
        return deltas

    def _record_verified(self, launched) -> None:
        """Speculative decodes: the accepted drafts and the token after them, one at a time, so
        that a stop condition met among them ends the request right there."""
        if launched.verification is None:
            return
        for request, drafts, output in launched.verification.result():
            request.draft_token_ids = []
            if not request.params.greedy:
                request.seed = None  # its tokens no longer follow one seed's draws: report none
            # The last token and the accepted drafts are computed; the token after them is not.
            request.num_computed_tokens += len(output.token_ids)
            for token_id, logprob in zip(output.token_ids, output.logprobs):
                self._record_token(request, token_id, logprob)
                if request.finished:
                    break
            self.scheduler.record_verified(request, len(drafts), len(output.token_ids) - 1)

    def _step_failed(self, batch) -> None:
        self.scheduler.forget_scheduled_blocks()
        for request in batch.speculative:
            request.draft_token_ids = []

    def _record_tokens(self, sampling: list[Request], sampler_output) -> None:
        """What the next step's scheduling needs, now: each request's new token, and whether it has
        finished (stop token, stop string, length). Requests that finished leave the batch here;
        their text and deltas wait in _pending for _process_outputs. Only requests with stop
        strings are detokenized here, since their text decides whether they go on."""
        for request, token_id, logprob in zip(sampling, sampler_output.token_ids, sampler_output.logprobs):
            self._record_token(request, token_id, logprob)

    def _record_token(self, request: Request, token_id: int, logprob) -> None:
        tracked = self._tracked[request.request_id]
        request.output_token_ids.append(token_id)
        text = None  # None: still to detokenize
        if token_id in request.stop_token_ids:
            self._finish(request, FinishReason.STOP, token_id)
            text = ""
        else:
            if request.grammar is not None and request.grammar.accept(token_id):
                self._finish(request, FinishReason.STOP, None)  # the structured output is complete
            if request.params.stop:
                text, matched = tracked.stop_matcher.feed(tracked.detokenizer.add([token_id]))
                if matched is not None:
                    self._finish(request, FinishReason.STOP, matched)
            if not request.finished and (len(request.output_token_ids) >= request.params.max_new_tokens
                                         or request.num_tokens >= request.max_total_tokens):
                self._finish(request, FinishReason.LENGTH, None)
        if request.finished:
            self.scheduler.remove(request)
        # `request.finished` now: whether this token ends it (a speculative step records several)
        self._pending.append((tracked, token_id, logprob, text, request.finished))

    def _process_outputs(self) -> list[StreamDelta]:
        """Text and deltas of the recorded tokens (detokenizing, held-back stop-string text, logprobs)."""
        pending, self._pending = self._pending, []
        deltas = []
        for tracked, token_id, logprob, text, last in pending:
            request = tracked.request
            if self._tracked.get(request.request_id) is not tracked:
                continue  # cancelled since: its abort delta has been sent
            token_logprobs = None
            if logprob is not None:
                token_logprobs = [self._token_logprob(token_id, *logprob)]
                request.output_logprobs.extend(token_logprobs)
            if text is None:
                text = tracked.detokenizer.add([token_id])
            if last and not isinstance(request.stop_reason, str):
                text += self._held_back_text(tracked)
            delta = self._delta(request, text, [token_id], token_logprobs, last)
            if request.params.prompt_logprobs is not None and not tracked.prompt_logprobs_sent:
                delta.prompt_logprobs = self._prompt_logprobs(request, tracked.prompt_logprobs)
                tracked.prompt_logprobs_sent = True
            deltas.append(delta)
            if last:
                del self._tracked[request.request_id]
        return deltas

    @staticmethod
    def _held_back_text(tracked: _Tracked) -> str:
        """At the end of a request not cut by a stop string: the text still held back, first as an
        incomplete character (U+FFFD for its missing bytes, as a whole decode shows it: a length
        limit can fall inside a character), then as a possible start of a stop string. Should
        that text complete a stop string after all, the request ends there, by that string."""
        text, matched = tracked.stop_matcher.feed(tracked.detokenizer.flush())
        if matched is not None:
            tracked.request.finish_reason, tracked.request.stop_reason = FinishReason.STOP.value, matched
            return text
        return text + tracked.stop_matcher.flush()

    def _finish(self, request: Request, reason: FinishReason, stop_reason) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason.value
        request.stop_reason = stop_reason

    def _prompt_logprobs(self, request: Request, by_position: dict) -> list[TokenLogprob | None]:
        """One entry per prompt token; the first has nothing before it to be scored on (None)."""
        prompt = request.prompt_token_ids
        return [None] + [self._token_logprob(prompt[position], *by_position[position]) for position in range(1, len(prompt))]

    def _token_logprob(self, token_id: int, logprob: float, alternatives: list[tuple[int, float]]) -> TokenLogprob:
        text = self.tokenizer.token_text
        entry = TokenLogprob(token_id, text(token_id), logprob, [(t, text(t), lp) for t, lp in alternatives])
        for shown_id, shown in [(token_id, entry.token), *[(t, shown) for t, shown, _ in entry.top]]:
            if REPLACEMENT_CHARACTER in shown:
                entry.partial_bytes[shown_id] = self.tokenizer.token_bytes(shown_id)
        return entry

    def _delta(self, request: Request, text: str, token_ids: list[int], logprobs, last: bool = True) -> StreamDelta:
        """`last`: the request's final delta (its finish reason goes with it)."""
        return StreamDelta(
            request_id=request.request_id,
            text=text,
            token_ids=token_ids,
            logprobs=logprobs,
            finished=last,
            finish_reason=request.finish_reason if last else None,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_tokens=request.num_cached_tokens or 0,
            num_generated_tokens=len(request.output_token_ids),
            stop_reason=request.stop_reason if last else None,
            seed=request.seed,
        )
