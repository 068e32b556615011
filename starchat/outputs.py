"""What the engine hands back: whole completions and streaming deltas."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    STOP = "stop"  # end-of-sequence token, stop token id or stop string
    LENGTH = "length"  # max_new_tokens or the context length reached
    ABORT = "abort"  # cancelled by the caller (client disconnect, timeout, Stop button)


@dataclass
class TokenLogprob:
    """Log-probability of one generated token under the model, with the top alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token_id, token text, logprob)
    # The bytes of those tokens here (this one and the alternatives) whose text does not show them:
    # pieces of a UTF-8 character, whose text is U+FFFD. Any other token's bytes are its text's.
    partial_bytes: dict[int, bytes] = field(default_factory=dict)

    def token_bytes(self, token_id: int, text: str) -> bytes:
        """The bytes of this token or of one of its alternatives (`text`: that token's text)."""
        return self.partial_bytes.get(token_id) or text.encode("utf-8")


@dataclass
class Completion:
    """One finished generation. `text` holds the generated text only (no prompt)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    # The stop string or token id that ended generation, when one did.
    stop_reason: str | int | None = None
    seed: int | None = None
    num_cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    # With SamplingParams.prompt_logprobs: one entry per prompt token (None for the first); on a
    # stream, in the first delta only
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class StreamDelta:
    """What one request gained in one engine step.

    `text` is the new, safe-to-show text (never a partial UTF-8 character, never a piece of a
    stop string); `token_ids` the new token ids. The last delta has `finished=True` and a
    `finish_reason`; its text may be empty, and ends with U+FFFD for the missing bytes of a
    character that the generation's end cut (as a whole decode of the tokens shows it).
    """

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_generated_tokens: int
    stop_reason: str | int | None = None
    seed: int | None = None
    num_cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    # With SamplingParams.prompt_logprobs: one entry per prompt token (None for the first); on a
    # stream, in the first delta only
    prompt_logprobs: list[TokenLogprob | None] | None = None
