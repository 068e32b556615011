"""The shipped StarCoder/StarChat tokenizer against llama.cpp's test vectors, published ids and HF
transformers; the incremental detokenizer and the stop-string matcher against plain full decodes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from starchat.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

MODEL_DIR = Path(__file__).parents[1] / "starchat" / "models" / "starchat-nano"
VOCAB_DIR = Path(__file__).parents[2] / "shared" / "vocab"
VECTORS = VOCAB_DIR / "ggml-vocab-refact.gguf"
# The .inp/.out pair shipped with llama-cpp-python 0.3.36 holds 46 texts.
NUM_VECTORS = 46
SEPARATOR = "\n__ggml_vocab_test__\n"

MULTILINGUAL_TEXT = (
    "Café déjà vu, naïve façade. 日本語のテキスト、中文字符。Ελληνικά, русский. "
    "Emoji: 😀🚀👩‍👩‍👧‍👦 🇫🇷 ✅ and a byte-split 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 tail 🎉"
)


def read_test_vectors() -> list[tuple[str, list[int]]]:
    """Split the files exactly as llama.cpp's test-tokenizer-0 does.

    Texts are separated by "\\n__ggml_vocab_test__\\n" (the newlines belong to the separator,
    so a text may itself be empty or made of newlines), the file ends with a separator, and
    the .out file has one line of space-separated ids per text. Read as bytes so that no
    newline translation touches the texts.
    """
    raw = (VECTORS.parent / (VECTORS.name + ".inp")).read_bytes().decode("utf-8")
    texts: list[str] = []
    position = 0
    while position < len(raw):
        next_separator = raw.find(SEPARATOR, position)
        if next_separator == -1:
            texts.append(raw[position:])
            break
        texts.append(raw[position:next_separator])
        position = next_separator + len(SEPARATOR)
    out_lines = (VECTORS.parent / (VECTORS.name + ".out")).read_bytes().decode("utf-8").split("\n")
    if out_lines and out_lines[-1] == "":
        out_lines.pop()
    if len(texts) != len(out_lines):
        raise ValueError(f"{len(texts)} texts but {len(out_lines)} expected-id lines in {VECTORS}.inp/.out")
    return [(text, [int(token_id) for token_id in line.split()]) for text, line in zip(texts, out_lines)]


TEST_VECTORS = read_test_vectors()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(MODEL_DIR)


def test_vector_files_split_into_all_texts():
    assert len(TEST_VECTORS) == NUM_VECTORS
    texts = [text for text, _ in TEST_VECTORS]
    # Entries that only survive a correct split: empty, whitespace-only, leading/trailing newlines.
    assert "" in texts and "\n" in texts and "\n\n\n" in texts and "\t\n" in texts and "   " in texts


@pytest.mark.parametrize(
    ("text", "expected_ids"), TEST_VECTORS, ids=[f"vector{index:02d}" for index in range(len(TEST_VECTORS))]
)
def test_llama_cpp_vectors_encode_exactly(tokenizer: Tokenizer, text: str, expected_ids: list[int]):
    assert tokenizer.encode(text) == expected_ids


@pytest.mark.parametrize(
    ("token", "token_id"),
    [
        ("def", 589),
        ("():", 2262),
        ("Ġprint", 1459),
        ("Hello", 8279),
        ("ĠWorld", 10896),
        ("Ċ", 203),
        ("ĊĠĠĠ", 284),
        ("<|endoftext|>", 0),
        ("<fim_prefix>", 1),
        ("<fim_middle>", 2),
        ("<fim_suffix>", 3),
        ("<reponame>", 18),
        ("<|system|>", 49152),
        ("<|user|>", 49153),
        ("<|assistant|>", 49154),
        ("<|end|>", 49155),
    ],
)
def test_published_token_ids(tokenizer: Tokenizer, token: str, token_id: int):
    assert tokenizer.token_id(token) == token_id


def test_vocabulary_shape(tokenizer: Tokenizer):
    assert tokenizer.vocab_size == 49156
    assert tokenizer.eos_token_id == 0
    assert tokenizer.special_token_ids == frozenset(range(19)) | {49152, 49153, 49154, 49155}
    assert tokenizer.token_id("[PAD49156]") is None
    assert tokenizer.token_id("no such token") is None


def test_special_tokens_in_text_are_encoded_as_ids(tokenizer: Tokenizer):
    prompt = "<|system|>\n<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>"
    ids = tokenizer.encode(prompt)
    assert ids[:5] == [49152, 203, 49155, 203, 49153]
    assert ids[-1] == 49154
    assert tokenizer.encode("print(1)<|endoftext|>")[-1] == 0
    assert tokenizer.encode("")[:1] == []  # no BOS


def test_hf_transformers_autotokenizer_agrees(tokenizer: Tokenizer):
    transformers = pytest.importorskip("transformers")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))
    assert len(hf_tokenizer) == 49156
    assert hf_tokenizer.eos_token_id == 0
    assert hf_tokenizer.model_max_length == 8192
    texts = [
        "<|system|>\n<|end|>\n<|user|>\nWrite a function that adds 12 and 345.<|end|>\n<|assistant|>",
        "<fim_prefix>def add(a, b):\n<fim_suffix>\n    return c<fim_middle>",
        "x =  1\nfoo   42  # digits after several spaces",
        MULTILINGUAL_TEXT,
    ]
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ids
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)


def test_decode_round_trips(tokenizer: Tokenizer):
    for text in [text for text, _ in TEST_VECTORS] + [MULTILINGUAL_TEXT]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    prompt = "<|user|>\nHello<|end|>\n<|assistant|>"
    ids = tokenizer.encode(prompt)
    assert tokenizer.decode(ids, skip_special_tokens=False) == prompt
    assert tokenizer.decode(ids) == "\nHello\n"


def test_fast_decode_matches_tokenizers_decode(tokenizer: Tokenizer):
    everything = list(range(tokenizer.vocab_size))
    for skip_special_tokens in (True, False):
        expected = tokenizer.backend.decode(everything, skip_special_tokens=skip_special_tokens)
        assert tokenizer.decode(everything, skip_special_tokens) == expected
    rng = random.Random(0)
    for _ in range(50):  # random ids make invalid UTF-8: the replacement must match too
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 12))]
        assert tokenizer.decode(ids) == tokenizer.backend.decode(ids, skip_special_tokens=True)


def test_decode_rejects_ids_outside_the_vocabulary(tokenizer: Tokenizer):
    with pytest.raises(ValueError, match="49156"):
        tokenizer.decode([1, 49156])
    with pytest.raises(ValueError, match="-1"):
        tokenizer.decode([-1])


def test_token_text(tokenizer: Tokenizer):
    assert tokenizer.token_text(203) == "\n"
    assert tokenizer.token_text(1459) == " print"
    assert tokenizer.token_text(49155) == "<|end|>"
    # A token holding only the first bytes of a character shows the replacement character.
    partial_ids = [token_id for token_id in tokenizer.encode("😀") if "\ufffd" in tokenizer.token_text(token_id)]
    assert partial_ids


def test_from_dir_errors_name_the_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def _stream(detokenizer: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    return [detokenizer.add(ids[start : start + chunk]) for start in range(0, len(ids), chunk)]


def test_incremental_detokenizer_holds_partial_characters(tokenizer: Tokenizer):
    ids = tokenizer.encode(MULTILINGUAL_TEXT)
    # The text must really split characters over tokens, or this test proves nothing.
    assert any("\ufffd" in tokenizer.token_text(token_id) for token_id in ids)
    prompt_ids = tokenizer.encode("<|user|>\nSay something<|end|>\n<|assistant|>")
    for chunk in (1, 3):
        detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        pieces = _stream(detokenizer, ids, chunk)
        assert all("\ufffd" not in piece for piece in pieces)
        assert "".join(pieces) == tokenizer.decode(ids) == MULTILINGUAL_TEXT
        assert detokenizer.text == MULTILINGUAL_TEXT


def test_incremental_detokenizer_flush_gives_the_held_back_bytes_as_a_whole_decode_does(tokenizer: Tokenizer):
    ids = tokenizer.encode("ok 😀 中文")
    for end in range(1, len(ids) + 1):
        detokenizer = IncrementalDetokenizer(tokenizer, [49154])
        pieces = _stream(detokenizer, ids[:end])
        tail = detokenizer.flush()
        assert "".join(pieces) + tail == tokenizer.decode(ids[:end]) == detokenizer.text
        assert tail == "" or tail.endswith("\ufffd")  # only an incomplete character is held back
        assert detokenizer.flush() == ""


def test_token_bytes_join_into_the_texts_bytes(tokenizer: Tokenizer):
    for text in (MULTILINGUAL_TEXT, "<|user|>\nok 😀<|end|>", "def f():\n\treturn 'é'"):
        ids = tokenizer.encode(text)
        assert b"".join(tokenizer.token_bytes(token_id) for token_id in ids) == text.encode("utf-8")
    pieces = tokenizer.encode("😀")
    assert [tokenizer.token_text(piece) for piece in pieces] == ["\ufffd", "\ufffd"]
    assert b"".join(tokenizer.token_bytes(piece) for piece in pieces) == "😀".encode("utf-8")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.token_bytes(tokenizer.vocab_size)


def test_incremental_detokenizer_special_tokens(tokenizer: Tokenizer):
    ids = tokenizer.encode("\nDone.<|end|>")
    detokenizer = IncrementalDetokenizer(tokenizer, [49154])
    pieces = _stream(detokenizer, ids)
    assert pieces[-1] == ""  # the skipped <|end|> adds no text
    assert detokenizer.text == "\nDone."
    shown = IncrementalDetokenizer(tokenizer, [49154], skip_special_tokens=False)
    _stream(shown, ids)
    assert shown.text == "\nDone.<|end|>"


def test_incremental_detokenizer_window_stays_small(tokenizer: Tokenizer):
    ids = tokenizer.encode(MULTILINGUAL_TEXT * 20)
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("prompt " * 100))
    longest_window = 0
    for token_id in ids:
        detokenizer.add([token_id])
        longest_window = max(longest_window, len(detokenizer._token_ids))
    assert longest_window <= 12  # bounded by context + one character's tokens, not by length
    assert detokenizer.text == MULTILINGUAL_TEXT * 20


def _feed_all(matcher: StopStringMatcher, pieces: list[str]) -> tuple[str, str | None]:
    emitted = []
    for piece in pieces:
        text, matched = matcher.feed(piece)
        emitted.append(text)
        if matched is not None:
            return "".join(emitted), matched
    emitted.append(matcher.flush())
    return "".join(emitted), None


def test_stop_string_split_across_feeds():
    matcher = StopStringMatcher(["\nUser:"])
    assert matcher.feed("Hello there") == ("Hello there", None)
    assert matcher.feed("!\n") == ("!", None)  # "\n" could start the stop string
    assert matcher.feed("Us") == ("", None)
    assert matcher.feed("er: more") == ("", "\nUser:")
    assert matcher.matched == "\nUser:"
    assert matcher.feed("ignored") == ("", None)


def test_stop_string_at_start():
    assert _feed_all(StopStringMatcher(["###"]), ["###", " tail"]) == ("", "###")
    assert _feed_all(StopStringMatcher(["###"]), ["#", "#", "# tail"]) == ("", "###")


def test_stop_string_overlapping_candidates():
    assert _feed_all(StopStringMatcher(["abc"]), ["ab", "ab", "c", "d"]) == ("ab", "abc")
    assert _feed_all(StopStringMatcher(["abc"]), list("ababc")) == ("ab", "abc")
    assert _feed_all(StopStringMatcher(["aab"]), list("aaab")) == ("a", "aab")


def test_multiple_stop_strings_earliest_wins():
    assert _feed_all(StopStringMatcher(["world", "lo w"]), ["Hello world"]) == ("Hel", "lo w")
    assert _feed_all(StopStringMatcher(["</s>", "<|end|>"]), ["done<", "|end", "|>"]) == ("done", "<|end|>")
    assert _feed_all(StopStringMatcher(["ab", "abcd"]), ["xabcd"]) == ("x", "abcd")


def test_held_back_text_is_flushed_when_no_stop_matches():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("almost ST") == ("almost ", None)
    assert matcher.feed("O") == ("", None)
    assert matcher.flush() == "STO"
    assert matcher.flush() == ""
    assert _feed_all(StopStringMatcher(["STOP"]), ["a S", "T", "OP!"]) == ("a ", "STOP")
    assert _feed_all(StopStringMatcher(["STOP"]), ["a S", "T", "OOP!"]) == ("a STOOP!", None)


def test_no_stop_strings_pass_text_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == ("anything", None)
    assert matcher.flush() == ""


def test_invalid_stop_strings_are_rejected():
    with pytest.raises(ValueError, match=r"stop\[1\]"):
        StopStringMatcher(["ok", ""])
    with pytest.raises(TypeError):
        StopStringMatcher("single")  # type: ignore[arg-type]
