"""Generation controls shared by every entry point (Python API, HTTP APIs, batch jobs)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from starchat.errors import FieldError


class SamplingParamsError(FieldError):
    """A generation parameter is out of range; `field` names the offending parameter."""



GUIDED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class GuidedDecoding:
    """Output constrained to a language: every token is chosen among those that keep the text a
    prefix of a sentence of it, and the text ends when a sentence is complete.

    kind: `json_schema` (spec: the schema as JSON text), `json_object` (any JSON object; spec
    unused), `regex` (the whole output matches it), `choice` (spec: a JSON list of the allowed
    strings), `grammar` (spec: a Lark grammar, llguidance's dialect)."""

    kind: str
    spec: str = ""

    def validate(self) -> None:
        if self.kind not in GUIDED_KINDS:
            raise SamplingParamsError("guided", f"kind must be one of {', '.join(GUIDED_KINDS)}, got {self.kind!r}")
        if not isinstance(self.spec, str) or (not self.spec and self.kind != "json_object"):
            raise SamplingParamsError("guided", f"{self.kind} needs its {'schema' if self.kind == 'json_schema' else self.kind} as text")
        if self.kind in ("json_schema", "choice"):
            try:
                value = json.loads(self.spec)
            except ValueError as error:
                raise SamplingParamsError("guided", f"{self.kind} is not valid JSON: {error}") from None
            if self.kind == "choice" and not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
                raise SamplingParamsError("guided", "choice must be a non-empty list of strings")


@dataclass
class SamplingParams:
    """How to generate one completion.

    Greedy decoding is used when `do_sample` is False or `temperature` is 0 (below 1e-5).
    `top_k=0`, `top_p=1.0`, `min_p=0` and `typical_p=1.0` switch those filters off. `logprobs=None` returns no
    log-probabilities; `logprobs=n` returns the chosen token's plus the top-n alternatives.
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # Keep only tokens at least this fraction as likely as the most likely one (HF's and vLLM's
    # `min_p`; 0 = off), after top-p.
    min_p: float = 0.0
    # Locally typical sampling (HF's `typical_p`, TGI's): keep the tokens whose surprise is closest
    # to the distribution's entropy, up to this much probability mass; after top-k and top-p.
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    # OpenAI's: subtracted from a token's logit once if it occurs in the output so far (presence),
    # and once per occurrence (frequency); -2..2, 0 = off. Prompt tokens do not count.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Added to the logits of these token ids before sampling (OpenAI's logit_bias): -100..100,
    # where -100 bans a token and 100 all but forces it.
    logit_bias: dict[int, float] = field(default_factory=dict)
    do_sample: bool = False
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None
    # Log-probabilities of the prompt's tokens (each given the tokens before it) with the top-n
    # alternatives, in the first delta; such a prompt is computed whole (no prefix-cache reuse).
    prompt_logprobs: int | None = None
    # Structured output (a JSON schema, a regex, a grammar); None = free text.
    guided: GuidedDecoding | None = None
    # Benchmarks force a fixed output length; users normally leave this off.
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    MAX_LOGPROBS = 20

    @property
    def greedy(self) -> bool:
        # Temperatures this close to 0 are its limit, greedy decoding: dividing logits by them
        # would leave only infinities (as vLLM, which takes the same bound).
        return not self.do_sample or self.temperature < GREEDY_BELOW_TEMPERATURE

    def copy(self, **changes) -> "SamplingParams":
        """A copy with `changes` applied; list fields are copied, never shared."""
        changes.setdefault("stop", list(self.stop))
        changes.setdefault("stop_token_ids", list(self.stop_token_ids))
        changes.setdefault("logit_bias", dict(self.logit_bias))
        return replace(self, **changes)

    def validate(self, max_new_tokens_limit: int | None = None) -> "SamplingParams":
        """Raise SamplingParamsError naming the first bad field; return self when all are valid."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_int("min_new_tokens", self.min_new_tokens, minimum=0)
        if self.min_new_tokens > self.max_new_tokens:
            raise SamplingParamsError("min_new_tokens", f"{self.min_new_tokens} is larger than max_new_tokens ({self.max_new_tokens})")
        if max_new_tokens_limit is not None and self.max_new_tokens > max_new_tokens_limit:
            raise SamplingParamsError(
                "max_new_tokens",
                f"{self.max_new_tokens} does not fit: at most {max_new_tokens_limit} new tokens fit in the context after this prompt",
            )
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise SamplingParamsError("temperature", f"must be >= 0, got {self.temperature}")
        _check_int("top_k", self.top_k, minimum=0)
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError("top_p", f"must be in (0, 1], got {self.top_p}")
        _check_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError("min_p", f"must be in [0, 1], got {self.min_p}")
        _check_number("typical_p", self.typical_p)
        if not 0.0 < self.typical_p <= 1.0:
            raise SamplingParamsError("typical_p", f"must be in (0, 1], got {self.typical_p}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise SamplingParamsError("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2.0 <= value <= 2.0:
                raise SamplingParamsError(name, f"must be in [-2, 2], got {value}")
        if not isinstance(self.logit_bias, dict):
            raise SamplingParamsError("logit_bias", "must map token ids to biases")
        for token_id, bias in self.logit_bias.items():
            _check_int("logit_bias", token_id, minimum=0)
            _check_number("logit_bias", bias)
            if not -100.0 <= bias <= 100.0:
                raise SamplingParamsError("logit_bias", f"biases must be in [-100, 100], got {bias} for token {token_id}")
        if not isinstance(self.do_sample, bool):
            raise SamplingParamsError("do_sample", f"must be true or false, got {self.do_sample!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
            if self.seed >= 2**63:
                raise SamplingParamsError("seed", "must be below 2**63")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise SamplingParamsError("stop", "must be a list of strings")
        if any(s == "" for s in self.stop):
            raise SamplingParamsError("stop", "stop strings must not be empty")
        if not isinstance(self.stop_token_ids, list):
            raise SamplingParamsError("stop_token_ids", "must be a list of token ids")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, minimum=0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0)
            if self.logprobs > self.MAX_LOGPROBS:
                raise SamplingParamsError("logprobs", f"at most {self.MAX_LOGPROBS} alternatives, got {self.logprobs}")
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, minimum=0)
            if self.prompt_logprobs > self.MAX_LOGPROBS:
                raise SamplingParamsError("prompt_logprobs",
                                          f"at most {self.MAX_LOGPROBS} alternatives, got {self.prompt_logprobs}")
        if self.guided is not None:
            if not isinstance(self.guided, GuidedDecoding):
                raise SamplingParamsError("guided", "must be a GuidedDecoding")
            self.guided.validate()
        return self


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise SamplingParamsError(name, f"must be >= {minimum}, got {value}")


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingParamsError(name, f"must be a number, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise SamplingParamsError(name, f"must be finite, got {value}")
