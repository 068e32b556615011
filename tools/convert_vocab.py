"""Convert llama.cpp's StarCoder vocabulary (`ggml-vocab-refact.gguf`) into a Hugging Face tokenizer folder.

Why a converter: the StarCoder vocabulary is only redistributable to us through llama.cpp's
MIT-licensed vocab-only GGUF, while everything in starchat (and HF transformers) reads the
`tokenizers` JSON format. The GGUF holds the byte-level BPE tokens and merges; the
pre-tokenizer (digits split one by one, then GPT-2 byte-level splitting) is llama.cpp's
"refact" case, written here in its Hugging Face form.

Usage:
    python3 tools/convert_vocab.py --gguf ../shared/vocab/ggml-vocab-refact.gguf \
        --output starchat/models/starchat-nano

`--output` is a folder; `tokenizer.json`, `tokenizer_config.json` and
`special_tokens_map.json` are written into it. A path ending in `.json` is taken as the
`tokenizer.json` path itself and the other two files go next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

# StarCoder's BPE vocabulary proper; the GGUF's ids 49152..49215 are `[PAD...]` entries of
# another model (Refact) and must not leak into our id space.
BASE_VOCAB_SIZE = 49152
NUM_STARCODER_SPECIALS = 19
GGUF_TOKEN_TYPE_CONTROL = 3
# StarChat-beta's chat tokens, in the order its training code adds them (ids 49152..49155).
STARCHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 8192


class VocabConversionError(ValueError):
    """The GGUF does not hold the StarCoder vocabulary we expect."""


def _string_array(reader: gguf.GGUFReader, key: str) -> list[str]:
    field = reader.fields.get(key)
    if field is None:
        raise VocabConversionError(f"GGUF key {key!r} is missing; is this a vocab GGUF from llama.cpp?")
    return [bytes(field.parts[index]).decode("utf-8") for index in field.data]


def _int_array(reader: gguf.GGUFReader, key: str) -> list[int]:
    field = reader.fields.get(key)
    if field is None:
        raise VocabConversionError(f"GGUF key {key!r} is missing; is this a vocab GGUF from llama.cpp?")
    return [int(field.parts[index][0]) for index in field.data]


def read_starcoder_vocab(gguf_path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Return (tokens of ids 0..49151, merges) from the GGUF, checking it is StarCoder's vocabulary."""
    reader = gguf.GGUFReader(str(gguf_path))
    tokens = _string_array(reader, "tokenizer.ggml.tokens")
    token_types = _int_array(reader, "tokenizer.ggml.token_type")
    merge_strings = _string_array(reader, "tokenizer.ggml.merges")

    if len(tokens) < BASE_VOCAB_SIZE:
        raise VocabConversionError(f"{gguf_path}: {len(tokens)} tokens, expected at least {BASE_VOCAB_SIZE}")
    control_ids = [i for i, kind in enumerate(token_types[:BASE_VOCAB_SIZE]) if kind == GGUF_TOKEN_TYPE_CONTROL]
    if control_ids != list(range(NUM_STARCODER_SPECIALS)) or tokens[0] != EOS_TOKEN:
        raise VocabConversionError(
            f"{gguf_path}: control tokens are {control_ids[:25]}, expected ids 0..18 starting with {EOS_TOKEN}"
        )
    dropped = tokens[BASE_VOCAB_SIZE:]
    if any(not token.startswith("[PAD") for token in dropped):
        raise VocabConversionError(f"{gguf_path}: ids >= {BASE_VOCAB_SIZE} are not all [PAD...] entries")

    merges: list[tuple[str, str]] = []
    for line_number, merge in enumerate(merge_strings):
        left, separator, right = merge.partition(" ")
        if not separator or not left or not right or " " in right:
            raise VocabConversionError(f"{gguf_path}: merge #{line_number} {merge!r} is not 'left right'")
        merges.append((left, right))
    return tokens[:BASE_VOCAB_SIZE], merges


def build_tokenizer(tokens: list[str], merges: list[tuple[str, str]]) -> Tokenizer:
    """Assemble the `tokenizers` pipeline that reproduces StarCoder's tokenization."""
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise VocabConversionError("the vocabulary holds duplicate tokens")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # As in StarCoder's own tokenizer.json: only fixes offsets, never adds BOS/EOS.
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)

    # normalized=False: the specials must match the raw text, never a byte-level rewrite of it.
    specials = [AddedToken(token, special=True, normalized=False) for token in tokens[:NUM_STARCODER_SPECIALS]]
    tokenizer.add_special_tokens(specials)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in STARCHAT_TOKENS])

    for offset, token in enumerate(STARCHAT_TOKENS):
        if tokenizer.token_to_id(token) != BASE_VOCAB_SIZE + offset:
            raise VocabConversionError(
                f"{token} got id {tokenizer.token_to_id(token)}, expected {BASE_VOCAB_SIZE + offset}"
            )
    return tokenizer


def tokenizer_config(tokens: list[str]) -> dict:
    """The `tokenizer_config.json` that lets HF transformers' AutoTokenizer load the folder."""
    added_tokens_decoder = {
        str(token_id): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token_id, token in list(enumerate(tokens[:NUM_STARCODER_SPECIALS]))
        + [(BASE_VOCAB_SIZE + offset, token) for offset, token in enumerate(STARCHAT_TOKENS)]
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "additional_special_tokens": list(STARCHAT_TOKENS),
        "added_tokens_decoder": added_tokens_decoder,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
    }


def special_tokens_map() -> dict:
    return {
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "additional_special_tokens": list(STARCHAT_TOKENS),
    }


def convert(gguf_path: Path, output: Path) -> Path:
    """Write the three tokenizer files; return the folder they are in."""
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file (pass --gguf path/to/ggml-vocab-refact.gguf)")
    folder = output.parent if output.suffix == ".json" else output
    tokenizer_path = output if output.suffix == ".json" else folder / "tokenizer.json"
    folder.mkdir(parents=True, exist_ok=True)

    tokens, merges = read_starcoder_vocab(gguf_path)
    tokenizer = build_tokenizer(tokens, merges)
    tokenizer.save(str(tokenizer_path), pretty=False)
    for name, content in (
        ("tokenizer_config.json", tokenizer_config(tokens)),
        ("special_tokens_map.json", special_tokens_map()),
    ):
        (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True, help="vocab-only GGUF (ggml-vocab-refact.gguf)")
    parser.add_argument("--output", type=Path, required=True, help="output folder (or path of tokenizer.json)")
    args = parser.parse_args(argv)
    try:
        folder = convert(args.gguf, args.output)
    except (FileNotFoundError, VocabConversionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    print(f"wrote {folder}: tokenizer.json ({tokenizer.get_vocab_size(with_added_tokens=True)} tokens), "
          "tokenizer_config.json, special_tokens_map.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
