"""StarCoder -> StarChat: the four tokens are added when the base lacks them, and the embedding grows."""

from __future__ import annotations

import json

import pytest
import torch

from reference_checkpoints import EMBEDDED_MODEL_DIR
from starchat.chat_template import DialogueTemplate
from starchat.tokenizer import Tokenizer
from starchat.train.model_setup import prepare_model
from starchat.train.special_tokens import STARCHAT_TOKENS, write_tokenizer_files
from starchat.train.tokenization import tokenize_dialogue
from train_helpers import write_starcoder_base


@pytest.mark.parametrize("tied", [True, False])
def test_tokens_added_and_embedding_resized_with_mean_rows(tmp_path, tied):
    base = write_starcoder_base(tmp_path / "base", tie_word_embeddings=tied)
    assert Tokenizer.from_dir(base).token_id("<|end|>") is None
    from transformers import GPTBigCodeForCausalLM

    original = GPTBigCodeForCausalLM.from_pretrained(base, dtype=torch.float32)
    prepared = prepare_model(str(base), add_chat_tokens=True)
    assert prepared.added_tokens == list(STARCHAT_TOKENS)
    assert prepared.new_token_ids == [49152, 49153, 49154, 49155]
    model = prepared.hf_model
    embedding = model.get_input_embeddings().weight
    assert embedding.shape == (49156, 64) and model.config.vocab_size == 49156
    torch.testing.assert_close(embedding[:49152], original.get_input_embeddings().weight, rtol=0, atol=0)
    for row in embedding[49152:]:
        torch.testing.assert_close(row, original.get_input_embeddings().weight.mean(0))
    output = model.get_output_embeddings().weight
    assert output.shape == (49156, 64)
    assert (output.data_ptr() == embedding.data_ptr()) == tied
    if not tied:
        torch.testing.assert_close(output[49155], original.get_output_embeddings().weight.mean(0))

    # The grown tokenizer encodes a dialogue exactly as StarChat's own tokenizer does.
    write_tokenizer_files(prepared.tokenizer_backend, base, tmp_path / "out")
    grown = Tokenizer.from_dir(tmp_path / "out")
    shipped = Tokenizer.from_dir(EMBEDDED_MODEL_DIR)
    messages = [{"role": "user", "content": "Sort a list?"}, {"role": "assistant", "content": "sorted(x)"}]
    assert tokenize_dialogue(messages, grown, DialogueTemplate()) == tokenize_dialogue(messages, shipped, DialogueTemplate())
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"]["49155"]["content"] == "<|end|>"
    assert config["additional_special_tokens"] == list(STARCHAT_TOKENS)


def test_base_with_the_tokens_is_left_alone(tiny_model_dir):
    prepared = prepare_model(str(tiny_model_dir), add_chat_tokens=True)
    assert prepared.added_tokens == [] and prepared.hf_model.get_input_embeddings().weight.shape[0] == 49156


def test_grown_tokenizer_loads_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    base = write_starcoder_base(tmp_path / "base")
    prepared = prepare_model(str(base), add_chat_tokens=True)
    write_tokenizer_files(prepared.tokenizer_backend, base, tmp_path / "out")
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "<|system|>\n<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>"
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == Tokenizer.from_dir(tmp_path / "out").encode(text)
    assert hf_tokenizer.convert_tokens_to_ids("<|end|>") == 49155


def test_prepare_model_records_the_base_dtype_for_saving(tmp_path):
    from starchat.config import ModelConfig
    from starchat.model.random_checkpoint import write_random_checkpoint

    config = ModelConfig(vocab_size=49156, n_positions=64, n_embd=32, n_layer=1, n_head=2, n_inner=64)
    base = write_random_checkpoint(tmp_path / "fp16", config, dtype=torch.float16, tokenizer_dir=EMBEDDED_MODEL_DIR)
    prepared = prepare_model(str(base), add_chat_tokens=True)
    assert prepared.base_dtype == "float16"  # the save default, although training runs in float32
    assert prepared.hf_model.get_input_embeddings().weight.dtype == torch.float32
