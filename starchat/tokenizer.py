"""Tokenizer, incremental detokenizer and stop-string matcher: text in, token ids out, and back.

StarCoder's vocabulary is byte-level BPE: one token may hold part of a UTF-8 character, so
text can only be shown once the character is complete (`IncrementalDetokenizer`), and a stop
string may arrive split over several tokens (`StopStringMatcher`). Encoding is delegated to
Hugging Face `tokenizers`; decoding of byte-level vocabularies uses a precomputed
id -> bytes table because the engine decodes every sequence at every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders

TOKENIZER_FILE_NAME = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
REPLACEMENT_CHARACTER = "\ufffd"
# How many prompt tokens the detokenizer decodes as context before the first generated one
# (vLLM's choice): enough for any UTF-8 character split over byte-level tokens.
INITIAL_DETOKENIZATION_CONTEXT = 5
_CONVERT_HINT = (
    "create it from the StarCoder vocabulary with "
    "`python3 tools/convert_vocab.py --gguf ggml-vocab-refact.gguf --output <model folder>`, "
    "or copy the tokenizer.json of the Hugging Face checkpoint"
)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (character -> byte).

    Byte-level BPE stores byte b as a visible character (space -> "Ġ", newline -> "Ċ"); the
    mapping is fixed by GPT-2 and shared by every byte-level vocabulary.
    """
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    next_free = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + next_free)
            next_free += 1
    return {chr(character): byte for byte, character in zip(printable, characters)}


class Tokenizer:
    """A Hugging Face `tokenizers.Tokenizer` with the few operations the engine and servers need.

    Special tokens written in the text (`<|user|>`, `<fim_prefix>`, ...) are encoded as their
    ids, because StarChat prompts are built as text; no BOS is ever added.
    """

    def __init__(self, backend: tokenizers.Tokenizer):
        self._backend = backend
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._id_limit = self._vocab_size  # ids decodable: raised to the model's by cover_model_vocabulary
        eos_token_id = backend.token_to_id(EOS_TOKEN)
        if eos_token_id is None:
            raise ValueError(f"the tokenizer has no {EOS_TOKEN} token: not a StarCoder-family vocabulary")
        self._eos_token_id = eos_token_id
        self._special_token_ids = frozenset(
            token_id for token_id, token in backend.get_added_tokens_decoder().items() if token.special
        )
        # Two tables so that decoding is one list comprehension with no per-token branch.
        self._token_bytes: list[bytes] | None = None
        self._token_bytes_no_special: list[bytes] | None = None
        if isinstance(backend.decoder, decoders.ByteLevel):
            self._token_bytes = self._build_byte_table()
            self._token_bytes_no_special = [
                b"" if token_id in self._special_token_ids else token_bytes
                for token_id, token_bytes in enumerate(self._token_bytes)
            ]

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` from a model folder (a path to the file itself is accepted too)."""
        path = Path(path)
        file = path if path.is_file() else path / TOKENIZER_FILE_NAME
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} not found: the model folder needs a {TOKENIZER_FILE_NAME}; {_CONVERT_HINT}"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as error:  # tokenizers raises a bare Exception for unreadable JSON
            raise ValueError(f"{file} is not a valid tokenizers file ({error}); {_CONVERT_HINT}") from error
        return cls(backend)

    def _build_byte_table(self) -> list[bytes]:
        """The bytes of every token, as the ByteLevel decoder would produce them."""
        alphabet = _byte_level_alphabet()
        table: list[bytes] = []
        for token_id in range(self._vocab_size):
            token = self._backend.id_to_token(token_id)
            if token is None:
                table.append(b"")  # a hole in the id space decodes to nothing, as in `tokenizers`
            elif all(character in alphabet for character in token):
                table.append(bytes(alphabet[character] for character in token))
            else:
                # Same fallback as the ByteLevel decoder: a token outside the byte alphabet
                # (an added token such as "<|user|>" is inside it) stands for its UTF-8 bytes.
                table.append(token.encode("utf-8"))
        return table

    def cover_model_vocabulary(self, model_vocab_size: int) -> None:
        """Accept the ids a model has beyond this tokenizer's (vocabularies padded to a multiple of
        64 or 128 are common): they have no text, and decode to nothing, as in HF's `decode`, so that
        a model that generates one (or a prompt given as ids that holds one) is not an error."""
        if model_vocab_size <= self._id_limit:
            return
        extra = model_vocab_size - self._id_limit
        self._id_limit = model_vocab_size
        if self._token_bytes is not None:
            self._token_bytes = self._token_bytes + [b""] * extra
            self._token_bytes_no_special = self._token_bytes_no_special + [b""] * extra

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (49156 for StarChat)."""
        return self._vocab_size

    @property
    def eos_token_id(self) -> int:
        return self._eos_token_id

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_token_ids

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`, for callers that need offsets or batching."""
        return self._backend

    def token_id(self, token: str) -> int | None:
        """Id of a token given as it is stored (`"<|end|>"`, `"Ġprint"`), or None if absent."""
        return self._backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def _check_ids(self, token_ids: Sequence[int]) -> None:
        # A negative id would silently index the table from the end; say what is wrong instead.
        if token_ids and (min(token_ids) < 0 or max(token_ids) >= self._id_limit):
            bad = next(token_id for token_id in token_ids if not 0 <= token_id < self._id_limit)
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self._id_limit - 1})")

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `token_ids`; an incomplete UTF-8 character comes out as U+FFFD."""
        self._check_ids(token_ids)
        table = self._token_bytes_no_special if skip_special_tokens else self._token_bytes
        if table is None:
            return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        return b"".join([table[token_id] for token_id in token_ids]).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        """Text of one token, special tokens included, for logprob listings (may hold U+FFFD)."""
        return self.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (special tokens included): a token that holds part of a UTF-8
        character has bytes its text (U+FFFD) does not show, and the bytes of consecutive tokens
        join into the text's bytes (OpenAI's logprobs `bytes`)."""
        self._check_ids([token_id])
        if self._token_bytes is None:
            return self.token_text(token_id).encode("utf-8")
        return self._token_bytes[token_id]


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text that is safe to show as it arrives.

    Prefix/read-offset method (as in TGI and vLLM): decode only the window of tokens from
    `prefix_offset`, compare with the decode of the window up to `read_offset`, and emit the
    difference unless it ends in U+FFFD (an incomplete character, held until its last byte
    arrives). The window stays a few tokens long, so each step costs the same at any length.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # The prompt's last tokens are decoded as context only, never emitted.
        self._token_ids: list[int] = list(prompt_token_ids[-INITIAL_DETOKENIZATION_CONTEXT:])
        self._read_offset = len(self._token_ids)
        self._prefix_offset = 0
        self._text = ""

    @property
    def text(self) -> str:
        """All generated text emitted so far (held-back bytes of an incomplete character excluded)."""
        return self._text

    def flush(self) -> str:
        """At the end of generation: the text of tokens still held back as an incomplete
        character, each missing byte shown as U+FFFD (as a whole decode shows them), so that all
        the text emitted equals the decode of all the tokens."""
        decode = self._tokenizer.decode
        prefix_text = decode(self._token_ids[self._prefix_offset : self._read_offset], self._skip_special_tokens)
        window_text = decode(self._token_ids[self._prefix_offset :], self._skip_special_tokens)
        tail = window_text[len(prefix_text) :] if len(window_text) > len(prefix_text) else ""
        self._prefix_offset = self._read_offset = len(self._token_ids)
        self._text += tail
        return tail

    def add(self, token_ids: Sequence[int]) -> str:
        """Take newly generated tokens; return the new text that can be shown now."""
        new_text = "".join([self._add_one(token_id) for token_id in token_ids])
        self._text += new_text
        return new_text

    def _add_one(self, token_id: int) -> str:
        self._token_ids.append(token_id)
        decode = self._tokenizer.decode
        prefix_text = decode(self._token_ids[self._prefix_offset : self._read_offset], self._skip_special_tokens)
        window_text = decode(self._token_ids[self._prefix_offset :], self._skip_special_tokens)
        if window_text.endswith(REPLACEMENT_CHARACTER):
            return ""  # the last character is not complete yet: keep its tokens in the window
        new_text = window_text[len(prefix_text) :] if len(window_text) > len(prefix_text) else ""
        # Everything up to here is shown: slide the window so it never grows.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        if self._prefix_offset > INITIAL_DETOKENIZATION_CONTEXT:
            # Drop ids that no window can reach again, so a long generation holds O(1) ids.
            del self._token_ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return new_text


class StopStringMatcher:
    """Cuts streamed text at the first stop string, even one split across several tokens.

    Text that might be the start of a stop string is held back until the next text decides
    it; the stop string itself and anything after it are never emitted. When several stop
    strings complete in the same text, the one that starts earliest wins (the longest on a
    tie), so the emitted text is the shortest correct prefix.
    """

    def __init__(self, stop: Sequence[str]):
        if isinstance(stop, str):
            raise TypeError("stop must be a list of strings, not a single string")
        for position, stop_string in enumerate(stop):
            if not isinstance(stop_string, str) or not stop_string:
                raise ValueError(f"stop[{position}] must be a non-empty string, got {stop_string!r}")
        self._stop = tuple(dict.fromkeys(stop))
        self._held = ""
        self._matched: str | None = None

    @property
    def matched(self) -> str | None:
        """The stop string that ended the text, once one has."""
        return self._matched

    def feed(self, new_text: str) -> tuple[str, str | None]:
        """Return (text safe to emit now, the stop string matched here or None).

        After a match the request is over: later calls emit nothing and report no new match.
        """
        if self._matched is not None:
            return "", None
        if not self._stop:
            return new_text, None
        text = self._held + new_text
        match_start, match = -1, None
        for stop_string in self._stop:
            start = text.find(stop_string)
            if start != -1 and (
                match is None or start < match_start or (start == match_start and len(stop_string) > len(match))
            ):
                match_start, match = start, stop_string
        if match is not None:
            self._held = ""
            self._matched = match
            return text[:match_start], match
        held_length = self._longest_suffix_that_starts_a_stop(text)
        self._held = text[len(text) - held_length :] if held_length else ""
        return text[: len(text) - held_length], None

    def _longest_suffix_that_starts_a_stop(self, text: str) -> int:
        longest = 0
        for stop_string in self._stop:
            # Only suffixes longer than the current best can improve it.
            for length in range(min(len(stop_string) - 1, len(text)), longest, -1):
                if text.endswith(stop_string[:length]):
                    longest = length
                    break
        return longest

    def flush(self) -> str:
        """Held-back text, released at the end of generation when no stop string matched."""
        held, self._held = self._held, ""
        return held
