"""The offline Python API: `LLM(...).generate([...])` and `LLM(...).chat([...])`."""

from __future__ import annotations

from typing import Iterator

from starchat.config import EngineConfig
from starchat.engine.engine import LLMEngine
from starchat.outputs import Completion, StreamDelta
from starchat.sampling_params import SamplingParams


class LLM:
    """A model ready to generate. `model=None` is the embedded default model.

    Extra keyword arguments are EngineConfig fields (max_num_seqs, kv_cache_memory_bytes, ...).
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "auto",
                 progress: bool = True, **engine_options):
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype, device=device, **engine_options), progress=progress)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Complete every prompt; all run together through continuous batching. Order is kept."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"params: {len(params_list)} SamplingParams for {len(prompts)} prompts")
        prompt_ids = []
        for prompt, prompt_params in zip(prompts, params_list):  # validate all before starting any
            ids = self.engine.tokenize_prompt(prompt)
            self.engine.check_request(ids, prompt_params)
            prompt_ids.append(ids)
        request_ids = [self.engine.add_request(ids, p) for ids, p in zip(prompt_ids, params_list)]
        collected = {rid: _Collector(ids) for rid, ids in zip(request_ids, prompt_ids)}
        try:
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    collected[delta.request_id].add(delta)
        except BaseException:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            raise
        return [collected[rid].completion() for rid in request_ids]

    def chat(self, messages: list[dict], params: SamplingParams | None = None, system: str | None = None) -> Completion:
        """The assistant's reply to a conversation in StarChat's dialogue format."""
        prompt, chat_params = self.engine.chat_request(messages, params, system)
        completion = self.generate([prompt], chat_params)[0]
        completion.text = completion.text.lstrip()
        return completion

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Deltas of one request as they come; closing the iterator (or Ctrl-C) cancels it."""
        request_id = self.engine.add_request(prompt, params)
        finished = False
        try:
            while not finished:
                for delta in self.engine.step():
                    if delta.request_id == request_id:
                        finished = delta.finished
                        yield delta
        finally:
            if not finished:
                self.engine.abort_request(request_id)


class _Collector:
    def __init__(self, prompt_token_ids: list[int]):
        self.prompt_token_ids = prompt_token_ids
        self.text_parts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs = None
        self.prompt_logprobs = None
        self.last: StreamDelta | None = None

    def add(self, delta: StreamDelta) -> None:
        self.text_parts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.last = delta

    def completion(self) -> Completion:
        last = self.last
        return Completion(text="".join(self.text_parts), token_ids=self.token_ids, finish_reason=last.finish_reason,
                          prompt_token_ids=self.prompt_token_ids, logprobs=self.logprobs,
                          stop_reason=last.stop_reason, seed=last.seed, num_cached_tokens=last.num_cached_tokens,
                          prompt_logprobs=self.prompt_logprobs)
