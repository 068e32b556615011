"""Loss masking on a known dialogue, token by token, and agreement with the chat template's rendering."""

from __future__ import annotations

import pytest

from reference_checkpoints import EMBEDDED_MODEL_DIR
from starchat.chat_template import DialogueTemplate
from starchat.tokenizer import Tokenizer
from starchat.train.tokenization import IGNORE_INDEX, check_template_tokens, tokenize_dialogue, truncate

DIALOGUE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "def f(): pass"},
    {"role": "user", "content": "More"},
    {"role": "assistant", "content": "x = 1"},
]

# (token text, carries loss): system and user turns and every role token masked; each assistant
# turn learns its leading newline (the prompt ends at <|assistant|>), its content and its <|end|>.
EXPECTED = [
    ("<|system|>", False), ("\n", False), ("Be", False), (" brief", False), (".", False), ("<|end|>", False), ("\n", False),
    ("<|user|>", False), ("\n", False), ("Hi", False), ("<|end|>", False), ("\n", False),
    ("<|assistant|>", False), ("\n", True), ("def", True), (" f", True), ("():", True), (" pass", True), ("<|end|>", True),
    ("\n", False),
    ("<|user|>", False), ("\n", False), ("More", False), ("<|end|>", False), ("\n", False),
    ("<|assistant|>", False), ("\n", True), ("x", True), (" =", True), (" ", True), ("1", True), ("<|end|>", True),
    ("\n", False),
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(EMBEDDED_MODEL_DIR)


def test_labels_token_by_token(tokenizer):
    example = tokenize_dialogue(DIALOGUE, tokenizer, DialogueTemplate())
    actual = [(tokenizer.token_text(token), label != IGNORE_INDEX) for token, label in zip(example.input_ids, example.labels)]
    assert actual == EXPECTED
    for token, label in zip(example.input_ids, example.labels):
        assert label in (IGNORE_INDEX, token)  # a learned label is the token itself (HF shifts inside the loss)
    assert tokenizer.token_id("<|end|>") == 49155 and example.input_ids[18] == 49155


def test_ids_equal_the_rendered_dialogue(tokenizer):
    template = DialogueTemplate()
    for messages in (DIALOGUE, DIALOGUE[1:], [{"role": "user", "content": "  spaced\n\n"}, {"role": "assistant", "content": "\n\tcode()\n"}]):
        example = tokenize_dialogue(messages, tokenizer, template)
        assert list(example.input_ids) == tokenizer.encode(template.render(messages, add_generation_prompt=False))


def test_default_system_prompt_when_the_dialogue_has_none(tokenizer):
    template = DialogueTemplate(system="Help with code.")
    example = tokenize_dialogue(DIALOGUE[1:3], tokenizer, template)
    assert tokenizer.decode(list(example.input_ids), skip_special_tokens=False).startswith("<|system|>\nHelp with code.<|end|>\n")
    assert all(label == IGNORE_INDEX for label in example.labels[:10])


def test_truncate_keeps_the_start(tokenizer):
    example = tokenize_dialogue(DIALOGUE, tokenizer, DialogueTemplate())
    cut = truncate(example, 16)
    assert cut.input_ids == example.input_ids[:16] and cut.labels == example.labels[:16]
    assert truncate(example, 1000) is example


def test_template_tokens_must_exist(tokenizer):
    check_template_tokens(tokenizer, DialogueTemplate())
    with pytest.raises(ValueError, match="<\\|human\\|>"):
        check_template_tokens(tokenizer, DialogueTemplate(user_token="<|human|>"))
