"""Structured output: a grammar's matcher per request masks the tokens that would leave its language.

llguidance (the Rust library behind several serving stacks' structured output) compiles a JSON
schema, a regex or a Lark grammar against the vocabulary once per request, and for each next
token computes the set of tokens that keep the text a prefix of a sentence of the language (a
bitmask over the vocabulary, microseconds to a few milliseconds). The sampler bans every other
token before it chooses; the engine feeds each chosen token back to the matcher and ends the
request when the sentence is complete. The matcher works on token ids, so it agrees with the
tokenizer on every byte of the text.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import torch

from starchat.sampling_params import GuidedDecoding, SamplingParamsError
from starchat.tokenizer import Tokenizer


# JSON laid out as json.dumps does by default: a small model given free whitespace between tokens
# tends to fill its token budget with it.
_JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def _closed_objects(node):
    """The schema with every object that lists its properties closed to others unless it says
    otherwise (JSON Schema allows any extra property by default, and a model, given the choice,
    writes some: OpenAI's strict mode and other servers' default close them too)."""
    if isinstance(node, list):
        return [_closed_objects(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _closed_objects(value) for key, value in node.items()}
    if "properties" in node and not {"additionalProperties", "unevaluatedProperties", "patternProperties"} & set(node):
        node["additionalProperties"] = False
    return node


def _llguidance():
    """The library, imported on first use: free-text serving does not need it."""
    try:
        import llguidance
        import llguidance.numpy
    except ImportError as error:
        raise SamplingParamsError("guided", f"structured output needs the llguidance package ({error}); "
                                            "pip install llguidance") from None
    return llguidance


def grammar_text(guided: GuidedDecoding) -> str:
    """llguidance's grammar for a request's constraint."""
    llguidance = _llguidance()
    if guided.kind in ("json_object", "json_schema"):
        schema = _closed_objects(json.loads(guided.spec)) if guided.kind == "json_schema" else {"type": "object"}
        if isinstance(schema, dict):
            schema = {**schema, "x-guidance": {**_JSON_LAYOUT, **schema.get("x-guidance", {})}}
        return llguidance.grammar_from("json_schema", json.dumps(schema))
    if guided.kind == "regex":
        return llguidance.grammar_from("regex", guided.spec)
    if guided.kind == "choice":
        return llguidance.grammar_from("choice", guided.spec)
    return llguidance.grammar_from("lark", guided.spec)


class GrammarCompiler:
    """Builds matchers for one tokenizer (its llguidance view is made on first use: about 0.5 s)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        # The model's logits may have more rows than the tokenizer has tokens (padded embedding
        # tables) or, for benchmark shapes, fewer; the mask covers both and is cut to the logits.
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        self._ll_tokenizer = None  # llguidance.LLTokenizer, made on first use

    def _llg_tokenizer(self):
        if self._ll_tokenizer is None:
            self._ll_tokenizer = _llguidance().LLTokenizer(self._tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                        eos_token=self._tokenizer.eos_token_id)
        return self._ll_tokenizer

    def compile(self, guided: GuidedDecoding) -> "GrammarState":
        """A fresh matcher; SamplingParamsError (field `guided`) when the grammar does not compile."""
        try:
            grammar = grammar_text(guided)
        except (ValueError, TypeError) as error:
            raise SamplingParamsError("guided", f"{guided.kind}: {error}") from None
        matcher = _llguidance().LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise SamplingParamsError("guided", f"{guided.kind} does not compile: {matcher.get_error().strip()}")
        return GrammarState(matcher, self.vocab_size, self._tokenizer.eos_token_id)


@dataclass
class GrammarState:
    """One request's position in its grammar."""

    matcher: "llguidance.LLMatcher"
    vocab_size: int
    eos_token_id: int

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many of `token_ids`, from the first, the grammar allows here (drafts past the
        first it bans would be rejected anyway)."""
        return self.matcher.validate_tokens(token_ids)

    def accept(self, token_id: int) -> bool:
        """Advance past a chosen token; True when the text is a complete sentence that nothing may
        follow (the request ends there)."""
        self.matcher.consume_token(token_id)
        return self.matcher.is_stopped()


def allowed_tokens(rows: list[tuple[GrammarState, list[int]]], width: int) -> torch.Tensor:
    """(len(rows), width) bool: the tokens each row's state allows next after the row's drafts
    (speculative verification: a request's rows come in order, the drafts before each, [] first).
    A matcher whose drafts leave its language, or in an error state, allows end-of-text alone
    there (the masks of the rows before make such rows unreachable). Computed on llguidance's
    threads, which leave the matchers where they were."""
    llguidance = _llguidance()
    bitmask = np.zeros((len(rows), -(-rows[0][0].vocab_size // 32)), dtype=np.int32)
    entries = []  # (matcher, first row, drafts): the masks after each prefix of drafts, in rows first..
    first = 0
    while first < len(rows):
        state = rows[first][0]
        last = first
        while last + 1 < len(rows) and rows[last + 1][0] is state and len(rows[last + 1][1]) == last + 1 - first:
            last += 1
        entries.append((state.matcher, first, list(rows[last][1])))
        first = last + 1
    plain = [(matcher, row) for matcher, row, drafts in entries if not drafts]
    drafted = [entry for entry in entries if entry[2]]
    if plain:
        llguidance.numpy.fill_next_token_bitmask_par(_executor(), plain, bitmask)
    if drafted:  # (llguidance takes no empty draft lists here)
        llguidance.numpy.fill_next_token_bitmask_par_with_draft_tokens(_executor(), drafted, bitmask)
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :width]
    if bits.shape[1] < width:  # logits past the mask's end: never allowed
        bits = np.pad(bits, ((0, 0), (0, width - bits.shape[1])))
    allowed = torch.from_numpy(bits.astype(bool))
    for row, (state, _) in enumerate(rows):
        if state.matcher.is_error() or not allowed[row].any():
            allowed[row] = False
            allowed[row, state.eos_token_id] = True
    return allowed


@functools.lru_cache(maxsize=1)
def _executor():
    """llguidance's thread pool for masks (one thread per core)."""
    return _llguidance().LLExecutor()
