"""StarCoder(Plus) -> StarChat: add the four dialogue tokens and grow the embedding matrix.

StarChat-beta is StarCoderPlus with `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>` appended
to the 49,152-token vocabulary (ids 49152..49155). A base that lacks some of them gets the missing
ones, in that order, as special tokens; the embedding (and an untied lm_head) gets one new row
per token, set to the mean of the existing rows: a neutral start that keeps the first losses sane.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import tokenizers
import torch

from starchat.chat_template import ASSISTANT_TOKEN, END_TOKEN, SYSTEM_TOKEN, USER_TOKEN
from starchat.tokenizer import EOS_TOKEN

STARCHAT_TOKENS = (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_TOKEN)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def add_starchat_tokens(backend: tokenizers.Tokenizer) -> list[str]:
    """Add the StarChat tokens the tokenizer lacks; return the ones added (empty if none were missing)."""
    missing = [token for token in STARCHAT_TOKENS if backend.token_to_id(token) is None]
    if missing:
        backend.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False) for token in missing])
    return missing


def resize_embeddings(model, vocab_size: int, new_token_ids: list[int]) -> None:
    """Make the HF model's vocabulary `vocab_size` rows; rows of new_token_ids start at the mean row."""
    old_size = model.get_input_embeddings().weight.shape[0]
    if vocab_size > old_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    if not new_token_ids:
        return
    with torch.no_grad():
        for matrix in _vocabulary_matrices(model):
            original_rows = min(old_size, matrix.shape[0])
            mean_row = matrix[:original_rows].float().mean(dim=0).to(matrix.dtype)
            matrix[torch.tensor(new_token_ids)] = mean_row


def _vocabulary_matrices(model) -> list[torch.Tensor]:
    embedding = model.get_input_embeddings().weight
    matrices = [embedding]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != embedding.data_ptr():
        matrices.append(output.weight)
    return matrices


def write_tokenizer_files(backend: tokenizers.Tokenizer, base_dir: Path, output_dir: Path) -> None:
    """tokenizer.json from the (possibly grown) backend; the two HF side files updated to list StarChat's tokens."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    backend.save(str(output_dir / "tokenizer.json"))
    config_file = Path(base_dir) / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
        "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
    }
    decoder = config.setdefault("added_tokens_decoder", {})
    for token_id, token in sorted(backend.get_added_tokens_decoder().items()):
        decoder.setdefault(str(token_id), {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
                                           "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special})
    _add_additional_special_tokens(config)
    (output_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    map_file = Path(base_dir) / "special_tokens_map.json"
    special_map = json.loads(map_file.read_text(encoding="utf-8")) if map_file.is_file() else {
        "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    _add_additional_special_tokens(special_map)
    (output_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _add_additional_special_tokens(config: dict) -> None:
    listed = config.setdefault("additional_special_tokens", [])
    names = {entry if isinstance(entry, str) else entry.get("content") for entry in listed}
    listed.extend(token for token in STARCHAT_TOKENS if token not in names)


def copy_tokenizer_files(source_dir: Path, output_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, Path(output_dir) / name)
