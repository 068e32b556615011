"""Dialogues and code files -> token ids with loss labels.

A dialogue is rendered with StarChat's template one turn at a time, so each token's role is known:
labels are IGNORE_INDEX (no loss) on the system and user turns and on every role token; an
assistant turn carries loss on the newline after `<|assistant|>` (the model writes it itself,
see STARCHAT.md), its content and its `<|end|>`. The newline after `<|end|>` is masked: generation
has stopped by then. Turns are split at special tokens, which the tokenizer never merges with
text, so the ids equal those of encoding the whole rendered dialogue (tests check this).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from starchat.chat_template import DialogueTemplate, validate_messages
from starchat.tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX where no loss; otherwise equal to input_ids

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def check_template_tokens(tokenizer: Tokenizer, template: DialogueTemplate) -> None:
    """Each role/end marker must be one special token, or turns would bleed into each other."""
    for token in (template.system_token, template.user_token, template.assistant_token, template.end_token):
        if tokenizer.token_id(token) is None:
            raise ValueError(f"the tokenizer has no {token!r} token; add StarChat's tokens to it (sft does this for the base)")


def tokenize_dialogue(messages: Sequence[dict], tokenizer: Tokenizer, template: DialogueTemplate,
                      system: str | None = None) -> TokenizedExample:
    """Ids and labels of a full dialogue in StarChat's format (no generation prompt at the end)."""
    checked = validate_messages(list(messages))
    system_text = template.system if system is None else system
    if checked[0]["role"] == "system":
        system_text = checked[0]["content"]
        checked = checked[1:]
    input_ids: list[int] = []
    labels: list[int] = []

    def add(text: str, learn: bool) -> None:
        ids = tokenizer.encode(text)
        input_ids.extend(ids)
        labels.extend(ids if learn else [IGNORE_INDEX] * len(ids))

    add(template.system_token + template.mid_str + system_text + template.end_token + template.end_str, learn=False)
    for message in checked:
        if message["role"] == "user":
            add(template.user_token + template.mid_str + message["content"] + template.end_token + template.end_str,
                learn=False)
        else:
            add(template.assistant_token, learn=False)
            add(template.mid_str + message["content"] + template.end_token, learn=True)
            add(template.end_str, learn=False)
    return TokenizedExample(tuple(input_ids), tuple(labels))


def truncate(example: TokenizedExample, max_length: int) -> TokenizedExample:
    """Keep the first max_length tokens (the start of a dialogue gives the context of the rest)."""
    if len(example) <= max_length:
        return example
    return TokenizedExample(example.input_ids[:max_length], example.labels[:max_length])


def tokenize_documents(texts: Iterable[str], tokenizer: Tokenizer) -> Iterator[int]:
    """One stream of ids for causal-LM pre-training: each document followed by <|endoftext|>."""
    for text in texts:
        yield from tokenizer.encode(text)
        yield tokenizer.eos_token_id
