"""StarChat's dialogue format and fill-in-the-middle prompts.

The format (from StarChat's `dialogues.py`):
    <|system|>\n{system}<|end|>\n<|user|>\n{user}<|end|>\n<|assistant|>\n{reply}<|end|>\n ... <|assistant|>
A prompt for a new reply ends with `<|assistant|>` and no newline: the model writes it.
A checkpoint may bring its own `dialogue_template.json` (StarChat's training code writes one)
or a Jinja `chat_template` in `tokenizer_config.json`; both take precedence over the default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from starchat.errors import FieldError

SYSTEM_PROMPTS: dict[str, str] = {
    "default": (
        "Below is a dialogue between a human user and an AI assistant. The assistant is happy to "
        "help with almost anything, and will do its best to understand exactly what is needed."
    ),
    "no_system": "",
    "coding": "Below is a conversation between a human user and a helpful AI coding assistant.",
}

SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<fim_prefix>", "<fim_middle>", "<fim_suffix>"

_ROLES = ("system", "user", "assistant")


class ChatFormatError(FieldError):
    """A message list that cannot be rendered; `field` points at the bad part."""



@dataclass(frozen=True)
class DialogueTemplate:
    """The StarChat dialogue template; field names follow `dialogue_template.json`."""

    system: str = ""
    system_token: str = SYSTEM_TOKEN
    user_token: str = USER_TOKEN
    assistant_token: str = ASSISTANT_TOKEN
    end_token: str = END_TOKEN
    mid_str: str = "\n"
    end_str: str = "\n"

    @classmethod
    def from_json_file(cls, path: Path) -> "DialogueTemplate":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and isinstance(v, str)}
        return cls(**known)

    def to_json_dict(self) -> dict:
        return {"name": "starchat", "messages": [], **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    def _turn(self, token: str, content: str) -> str:
        return token + self.mid_str + content + self.end_token + self.end_str

    def render(self, messages: list[dict], system: str | None = None, add_generation_prompt: bool = True) -> str:
        """Render messages as a prompt. A system message in `messages` wins over `system`."""
        checked = validate_messages(messages)
        system_text = self.system if system is None else system
        if checked and checked[0]["role"] == "system":
            system_text = checked[0]["content"]
            checked = checked[1:]
        parts = [self._turn(self.system_token, system_text)]
        for message in checked:
            token = self.user_token if message["role"] == "user" else self.assistant_token
            parts.append(self._turn(token, message["content"]))
        if add_generation_prompt:
            parts.append(self.assistant_token)
        return "".join(parts)


def content_text(content, field: str):
    """A message's text: its OpenAI content parts' text joined; content that is not a list comes
    back as it is (the caller checks it is a string). Other parts (images, audio, files) are
    refused naming the field rather than dropped: the model would answer a question it was not asked."""
    if not isinstance(content, list):
        return content
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            shown = f"of type {kind!r}" if isinstance(kind, str) else "not a {\"type\": \"text\", \"text\": ...} object"
            raise ChatFormatError(field, f"part {index} is {shown}: this model reads text only; send the content "
                                         "as a string or as {\"type\": \"text\", \"text\": ...} parts")
        texts.append(part["text"])
    return "".join(texts)


def validate_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages", "must be a non-empty list of {role, content} objects")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatFormatError(f"messages[{index}]", "must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise ChatFormatError(f"messages[{index}].role", f"must be one of {', '.join(_ROLES)}, got {role!r}")
        content = content_text(content, f"messages[{index}].content")
        if not isinstance(content, str):
            raise ChatFormatError(f"messages[{index}].content", "must be a string")
        if role == "system" and index != 0:
            raise ChatFormatError(f"messages[{index}].role", "a system message may only come first")
        checked.append({"role": role, "content": content})
    return checked


class ChatTemplate:
    """Renders a conversation for one checkpoint: its Jinja template, its dialogue template, or StarChat's."""

    def __init__(self, dialogue: DialogueTemplate | None = None, jinja_source: str | None = None,
                 special_tokens: dict[str, str] | None = None):
        self.dialogue = dialogue or DialogueTemplate()
        self.jinja_source = jinja_source
        self._special_tokens = special_tokens or {}
        self._jinja = None
        if jinja_source:
            import jinja2  # only needed for checkpoints that bring a Jinja template
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
            env.globals["raise_exception"] = _raise_template_error
            self._jinja = env.from_string(jinja_source)

    @classmethod
    def from_model_dir(cls, model_dir: Path | None) -> "ChatTemplate":
        """dialogue_template.json first (StarChat's own file), then tokenizer_config.json's chat_template."""
        if model_dir is None:
            return cls()
        model_dir = Path(model_dir)
        dialogue_file = model_dir / "dialogue_template.json"
        if dialogue_file.is_file():
            return cls(dialogue=DialogueTemplate.from_json_file(dialogue_file))
        tokenizer_config = model_dir / "tokenizer_config.json"
        if tokenizer_config.is_file():
            data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
            source = data.get("chat_template")
            if isinstance(source, list):  # named templates: take "default"
                source = next((t.get("template") for t in source if t.get("name") == "default"), None)
            if isinstance(source, str) and source.strip():
                specials = {k: v for k, v in data.items() if k in ("bos_token", "eos_token") and isinstance(v, str)}
                return cls(jinja_source=source, special_tokens=specials)
        return cls()

    def render(self, messages: list[dict], system: str | None = None, add_generation_prompt: bool = True) -> str:
        if self._jinja is None:
            return self.dialogue.render(messages, system=system, add_generation_prompt=add_generation_prompt)
        checked = validate_messages(messages)
        if system is not None and checked[0]["role"] != "system":
            checked = [{"role": "system", "content": system}] + checked
        return self._jinja.render(messages=checked, add_generation_prompt=add_generation_prompt, **self._special_tokens)


def resolve_system_prompt(system: str | None) -> str | None:
    """A named prompt ("default", "no_system", "coding") or the text itself."""
    if system is None:
        return None
    return SYSTEM_PROMPTS.get(system, system)


def fim_prompt(prefix: str, suffix: str) -> str:
    """Fill-in-the-middle prompt of the StarCoder family: the model writes the middle."""
    return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"


def _raise_template_error(message: str):
    raise ChatFormatError("messages", message)
