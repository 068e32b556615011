"""StarChat's dialogue format, exactly as STARCHAT.md and StarChat's dialogues.py write it."""

import json

import pytest

from starchat.chat_template import SYSTEM_PROMPTS, ChatFormatError, ChatTemplate, DialogueTemplate


def test_exact_format_with_system_and_history():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Sort a list"},
    ]
    assert ChatTemplate().render(messages) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
        "<|user|>\nSort a list<|end|>\n<|assistant|>"
    )


def test_empty_system_still_emitted_and_named_prompts():
    assert ChatTemplate().render([{"role": "user", "content": "x"}]) == "<|system|>\n<|end|>\n<|user|>\nx<|end|>\n<|assistant|>"
    assert SYSTEM_PROMPTS["default"].startswith("Below is a dialogue between a human user and an AI assistant.")
    assert SYSTEM_PROMPTS["no_system"] == ""


def test_checkpoint_dialogue_template_json_wins(tmp_path):
    (tmp_path / "dialogue_template.json").write_text(json.dumps({"system": "S", "user_token": "<U>", "end_token": "</E>"}))
    rendered = ChatTemplate.from_model_dir(tmp_path).render([{"role": "user", "content": "q"}])
    assert rendered == "<|system|>\nS</E>\n<U>\nq</E>\n<|assistant|>"


def test_checkpoint_jinja_chat_template(tmp_path):
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    assert ChatTemplate.from_model_dir(tmp_path).render([{"role": "user", "content": "q"}]) == "[user]q[assistant]"


@pytest.mark.parametrize("messages, field", [
    ([], "messages"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "messages[1].role"),
    # content parts other than text are refused, not dropped (the model would answer another question)
    ([{"role": "user", "content": "x"}, {"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "u"}}]}], "messages[1].content"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content"),
])
def test_bad_messages_name_the_field(messages, field):
    with pytest.raises(ChatFormatError) as error:
        DialogueTemplate().render(messages)
    assert error.value.field == field


def test_text_content_parts_are_joined():
    parts = [{"type": "text", "text": "Reverse "}, {"type": "text", "text": "a list"}]
    assert DialogueTemplate().render([{"role": "user", "content": parts}]) == \
        DialogueTemplate().render([{"role": "user", "content": "Reverse a list"}])
