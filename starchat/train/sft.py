"""`starchat train sft`: StarChat's supervised fine-tuning of a GPTBigCode base on dialogues.

The recipe of StarChat-beta: dialogues rendered in StarChat's template, StarChat's tokens added
to the base when missing (embedding grown), loss on assistant tokens only, short dialogues
packed into full-length rows without attention across them, AdamW with cosine decay after
3% warm-up, lr 2e-5, 256 sequences per step, seed 42.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from starchat.chat_template import DialogueTemplate, resolve_system_prompt
from starchat.train import distributed as dist_utils
from starchat.train.collate import Row, pack_examples, pad_examples
from starchat.train.data import Dialogue, ReadResult, read_dialogues
from starchat.train.lora import LoraSettings
from starchat.train.loop import StepCallback, Trainer, TrainingArguments, TrainResult, begin_run
from starchat.train.model_setup import prepare_model
from starchat.train.special_tokens import write_tokenizer_files
from starchat.train.tokenization import IGNORE_INDEX, TokenizedExample, check_template_tokens, tokenize_dialogue, truncate
from starchat.tokenizer import Tokenizer

logger = logging.getLogger("starchat.train")

DEFAULT_MAX_SEQ_LEN = 2048


@dataclass
class SFTOptions:
    base: str
    data: list[Path]
    training: TrainingArguments
    eval_data: list[Path] = field(default_factory=list)
    eval_fraction: float = 0.05  # held out from `data` when no eval_data is given
    max_seq_len: int | None = None  # None: min(2048, the base's n_positions)
    packing: bool = True
    system: str | None = None  # a named system prompt or the text; None: the template's (empty)
    on_bad_record: str = "stop"
    prompt_column: str | None = None
    response_column: str | None = None
    lora: LoraSettings | None = None
    callbacks: list[StepCallback] = field(default_factory=list)


def run_sft(options: SFTOptions) -> TrainResult:
    args = options.training
    if not 0.0 <= options.eval_fraction < 1.0:
        raise ValueError(f"eval-fraction must be in [0, 1), got {options.eval_fraction}")
    if options.lora is not None and args.fsdp:
        raise ValueError("--fsdp with --lora-r is not supported: LoRA is meant to fit one device per process; use DDP")
    context, resume_dir = begin_run(args)
    try:
        train_read = _read(options.data, options)
        eval_read = _read(options.eval_data, options) if options.eval_data else None
        prepared = prepare_model(options.base, add_chat_tokens=True, lora_settings=options.lora, bf16=args.bf16,
                                 weights_dir=resume_dir if (resume_dir is not None and options.lora is None) else None)
        if prepared.added_tokens and context.is_main:
            logger.info("added %s to the tokenizer; embedding grown to %d rows", ", ".join(prepared.added_tokens),
                        prepared.hf_model.get_input_embeddings().weight.shape[0])
        if context.is_main:
            write_tokenizer_files(prepared.tokenizer_backend, prepared.base_dir, args.output_dir)
        template = DialogueTemplate(system=resolve_system_prompt(options.system) or "")
        tokenizer = prepared.tokenizer
        check_template_tokens(tokenizer, template)
        max_seq_len = options.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, prepared.hf_config.n_positions)
        if max_seq_len > prepared.hf_config.n_positions:
            raise ValueError(f"max-seq-len {max_seq_len} exceeds the base's context ({prepared.hf_config.n_positions} positions)")
        train_dialogues, eval_dialogues = split_held_out(train_read.dialogues, eval_read, options.eval_fraction, args.seed)
        train_rows = build_rows(train_dialogues, tokenizer, template, max_seq_len, options.packing, "train", context.is_main,
                                args.seed)
        eval_rows = build_rows(eval_dialogues, tokenizer, template, max_seq_len, options.packing, "eval", context.is_main,
                               args.seed)
        run_info = {"command": "sft", "base": options.base, "data": [str(p) for p in options.data],
                    "eval_data": [str(p) for p in options.eval_data], "max_seq_len": max_seq_len,
                    "packing": options.packing, "skipped_records": train_read.skipped,
                    "added_tokens": prepared.added_tokens, "train_dialogues": len(train_dialogues),
                    "eval_dialogues": len(eval_dialogues),
                    "lora": None if options.lora is None else vars(options.lora)}
        trainer = Trainer(prepared, train_rows, eval_rows, args, context, template, options.callbacks, resume_dir, run_info)
        return trainer.train()
    finally:
        dist_utils.shutdown_distributed()


def _read(paths: Sequence[Path], options: SFTOptions) -> ReadResult:
    result = read_dialogues(paths, options.on_bad_record, options.prompt_column, options.response_column)
    if result.skipped:
        logger.warning("skipped %d malformed record(s); first: %s", result.skipped, "; ".join(result.errors[:3]))
    return result


def split_held_out(dialogues: list[Dialogue], eval_read: ReadResult | None, fraction: float,
                   seed: int) -> tuple[list[Dialogue], list[Dialogue]]:
    """Eval files when given; else a seeded `fraction` of the dialogues (at least one when fraction > 0)."""
    if eval_read is not None:
        return dialogues, eval_read.dialogues
    if fraction <= 0 or len(dialogues) < 2:
        return dialogues, []
    count = max(1, round(fraction * len(dialogues)))
    order = torch.randperm(len(dialogues), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:count])
    return ([d for i, d in enumerate(dialogues) if i not in held_out],
            [d for i, d in enumerate(dialogues) if i in held_out])


def tokenize_dialogues(dialogues: Sequence[Dialogue], tokenizer: Tokenizer, template: DialogueTemplate,
                       max_seq_len: int) -> tuple[list[TokenizedExample], int, int]:
    """Examples, how many were truncated, how many were dropped (no assistant token left after truncation)."""
    examples, truncated, dropped = [], 0, 0
    for dialogue in dialogues:
        example = tokenize_dialogue(list(dialogue.messages), tokenizer, template)
        if len(example) > max_seq_len:
            truncated += 1
            example = truncate(example, max_seq_len)
        if all(label == IGNORE_INDEX for label in example.labels[1:]):
            dropped += 1
            continue
        examples.append(example)
    return examples, truncated, dropped


def build_rows(dialogues: Sequence[Dialogue], tokenizer: Tokenizer, template: DialogueTemplate, max_seq_len: int,
               packing: bool, split: str, verbose: bool, seed: int = 0) -> list[Row]:
    """Tokenized rows; when packing, dialogues are shuffled (seeded) first so a row mixes the whole file."""
    examples, truncated, dropped = tokenize_dialogues(dialogues, tokenizer, template, max_seq_len)
    if packing:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
        examples = [examples[i] for i in order]
    rows = pack_examples(examples, max_seq_len) if packing else pad_examples(examples)
    if verbose:
        logger.info("%s: %d dialogues -> %d rows of at most %d tokens (%s); %d truncated, %d dropped",
                    split, len(dialogues), len(rows), max_seq_len, "packed" if packing else "padded", truncated, dropped)
    return rows
