"""`starchat train pretrain`: causal-LM training on raw code files (the first stage of starchat-nano).

Files (or folders, walked in sorted order) are read as UTF-8, each followed by <|endoftext|>, the
ids concatenated and cut into rows of `max_seq_len` tokens with loss on every token, as
StarCoder was trained. Held-out files (`--eval-data`, or a seeded fraction of the files) give the
eval loss on code the model never saw.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from starchat.chat_template import DialogueTemplate
from starchat.train import distributed as dist_utils
from starchat.train.collate import Row, chunk_token_stream
from starchat.train.loop import StepCallback, Trainer, TrainingArguments, TrainResult, begin_run
from starchat.train.model_setup import prepare_model
from starchat.train.special_tokens import write_tokenizer_files

logger = logging.getLogger("starchat.train")

DEFAULT_EXTENSIONS = (".py",)


@dataclass
class PretrainOptions:
    base: str
    data: list[Path]  # files or folders
    training: TrainingArguments
    eval_data: list[Path] = field(default_factory=list)
    eval_fraction: float = 0.05  # of the files, when no eval_data is given
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    max_seq_len: int | None = None  # None: min(2048, the base's n_positions)
    callbacks: list[StepCallback] = field(default_factory=list)


def list_code_files(paths: Iterable[Path], extensions: Sequence[str]) -> list[Path]:
    """Files as given, and files under folders with a matching extension, each folder in sorted order."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in extensions))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return files


def read_texts(files: Sequence[Path]) -> tuple[list[str], int]:
    """File contents; files that are not UTF-8 (or empty) are skipped and counted."""
    texts, skipped = [], 0
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            skipped += 1
            continue
        if text.strip():
            texts.append(text)
        else:
            skipped += 1
    return texts, skipped


def rows_from_texts(texts: Sequence[str], tokenizer_backend, seq_len: int) -> list[Row]:
    eos = tokenizer_backend.token_to_id("<|endoftext|>")
    stream: list[int] = []
    for encoding in tokenizer_backend.encode_batch(list(texts), add_special_tokens=False):
        stream.extend(encoding.ids)
        stream.append(eos)
    return chunk_token_stream(stream, seq_len)


def split_files(files: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    if fraction <= 0 or len(files) < 2:
        return files, []
    count = max(1, round(fraction * len(files)))
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:count])
    return ([f for i, f in enumerate(files) if i not in held_out], [f for i, f in enumerate(files) if i in held_out])


def run_pretrain(options: PretrainOptions) -> TrainResult:
    args = options.training
    if not 0.0 <= options.eval_fraction < 1.0:
        raise ValueError(f"eval-fraction must be in [0, 1), got {options.eval_fraction}")
    context, resume_dir = begin_run(args)
    try:
        files = list_code_files(options.data, options.extensions)
        if not files:
            raise ValueError(f"no {'/'.join(options.extensions)} files under {', '.join(map(str, options.data))}")
        if options.eval_data:
            train_files, eval_files = files, list_code_files(options.eval_data, options.extensions)
        else:
            train_files, eval_files = split_files(files, options.eval_fraction, args.seed)
        prepared = prepare_model(options.base, add_chat_tokens=False, bf16=args.bf16, weights_dir=resume_dir)
        if context.is_main:
            write_tokenizer_files(prepared.tokenizer_backend, prepared.base_dir, args.output_dir)
        max_seq_len = options.max_seq_len or min(2048, prepared.hf_config.n_positions)
        if max_seq_len > prepared.hf_config.n_positions:
            raise ValueError(f"max-seq-len {max_seq_len} exceeds the base's context ({prepared.hf_config.n_positions} positions)")
        train_texts, skipped = read_texts(train_files)
        eval_texts, _ = read_texts(eval_files)
        train_rows = rows_from_texts(train_texts, prepared.tokenizer_backend, max_seq_len)
        eval_rows = rows_from_texts(eval_texts, prepared.tokenizer_backend, max_seq_len)
        if context.is_main:
            logger.info("pretrain: %d files (%d skipped) -> %d rows of %d tokens; %d held-out files -> %d rows",
                        len(train_texts), skipped, len(train_rows), max_seq_len, len(eval_texts), len(eval_rows))
        run_info = {"command": "pretrain", "base": options.base, "train_files": len(train_texts),
                    "eval_files": [str(f) for f in eval_files], "skipped_files": skipped, "max_seq_len": max_seq_len}
        trainer = Trainer(prepared, train_rows, eval_rows, args, context, DialogueTemplate(), options.callbacks,
                          resume_dir, run_info)
        return trainer.train()
    finally:
        dist_utils.shutdown_distributed()
