"""`starchat train sft` and `starchat train pretrain`.

Runs as one process, or under torchrun for several devices or machines:
    torchrun --nproc-per-node 8 -m starchat.cli.train sft --base bigcode/starcoderplus --data d.jsonl --output out
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

train_app = typer.Typer(
    help="Train GPTBigCode models: StarChat's supervised fine-tuning (sft) and causal-LM pre-training on code.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_TRAINING = "Training (StarChat-beta's recipe by default)"
_DATA = "Data"
_LORA = "LoRA"

Base = Annotated[str, typer.Option("--base", help="Base model: a local folder or a Hugging Face Hub id (e.g. bigcode/starcoderplus).")]
Output = Annotated[Path, typer.Option("--output", help="Folder for the trained model, checkpoints and logs.")]
EvalData = Annotated[Optional[list[Path]], typer.Option("--eval-data", help="Held-out files (repeatable); default: a fraction of --data.", rich_help_panel=_DATA)]
EvalFraction = Annotated[float, typer.Option("--eval-fraction", help="Share held out for eval loss when no --eval-data.", rich_help_panel=_DATA)]
MaxSeqLen = Annotated[Optional[int], typer.Option("--max-seq-len", help="Tokens per training row [default: min(2048, the base's context)].", rich_help_panel=_DATA)]
LearningRate = Annotated[float, typer.Option("--learning-rate", "--lr", help="Peak learning rate (AdamW).", rich_help_panel=_TRAINING)]
WarmupRatio = Annotated[float, typer.Option("--warmup-ratio", help="Share of steps spent warming up before the cosine decay.", rich_help_panel=_TRAINING)]
GlobalBatch = Annotated[int, typer.Option("--global-batch-size", help="Sequences per optimizer step, over all processes (micro x accumulation x processes).", rich_help_panel=_TRAINING)]
MicroBatch = Annotated[int, typer.Option("--micro-batch-size", help="Sequences per forward pass per process; accumulation makes up the rest.", rich_help_panel=_TRAINING)]
Epochs = Annotated[float, typer.Option("--num-epochs", help="Passes over the data.", rich_help_panel=_TRAINING)]
MaxSteps = Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer steps; overrides --num-epochs.", rich_help_panel=_TRAINING)]
WeightDecay = Annotated[float, typer.Option("--weight-decay", rich_help_panel=_TRAINING)]
MaxGradNorm = Annotated[float, typer.Option("--max-grad-norm", help="Gradient clipping threshold.", rich_help_panel=_TRAINING)]
Seed = Annotated[int, typer.Option("--seed", rich_help_panel=_TRAINING)]
Bf16 = Annotated[bool, typer.Option("--bf16", help="bfloat16 autocast (weights and optimizer stay float32; a LoRA base stays bfloat16).", rich_help_panel=_TRAINING)]
GradCkpt = Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations in the backward pass: less memory, ~30% slower.", rich_help_panel=_TRAINING)]
Fsdp = Annotated[bool, typer.Option("--fsdp", help="Shard parameters, gradients and optimizer state over the torchrun processes (FSDP2).", rich_help_panel=_TRAINING)]
EvalSteps = Annotated[Optional[int], typer.Option("--eval-steps", help="Evaluate every N steps [default: 10 times per run].", rich_help_panel=_TRAINING)]
SaveSteps = Annotated[Optional[int], typer.Option("--save-steps", help="Checkpoint every N steps; 0: none [default: as --eval-steps].", rich_help_panel=_TRAINING)]
SaveLimit = Annotated[int, typer.Option("--save-total-limit", help="Checkpoints kept.", rich_help_panel=_TRAINING)]
LoggingSteps = Annotated[int, typer.Option("--logging-steps", help="Write a log record every N steps.", rich_help_panel=_TRAINING)]
SaveDtype = Annotated[Optional[str], typer.Option("--save-dtype", help="float32 | bfloat16 | float16 for the final weights [default: the base's].", rich_help_panel=_TRAINING)]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in --output (same result as an uninterrupted run).", rich_help_panel=_TRAINING)]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda (under torchrun: each process its local GPU).", rich_help_panel=_TRAINING)]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")]


def _training_arguments(output: Path, **values):
    from starchat.train.loop import TrainingArguments

    return TrainingArguments(output_dir=output, **values)


def _run(function, options) -> None:
    from starchat.config import ModelConfigError
    from starchat.model.loader import CheckpointError
    from starchat.train.data import DataFormatError
    from starchat.train.stopping import TrainingInterrupted

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    try:
        result = function(options)
    except (DataFormatError, CheckpointError, ModelConfigError, ValueError, FileNotFoundError, ImportError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    except TrainingInterrupted as stopped:
        if rank == 0:
            typer.echo(str(stopped), err=True)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the first step
        if rank == 0:
            typer.echo("interrupted: the work since the last checkpoint is lost; --resume continues from that "
                       "checkpoint, if any", err=True)
        raise typer.Exit(130) from None
    if rank == 0:
        eval_text = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
        train_text = f", last train loss {result.train_loss:.4f}" if result.train_loss is not None else ""
        typer.echo(f"done: {result.steps} steps{train_text}{eval_text}; model in {result.output_dir}")


@train_app.command("sft")
def sft_command(
    base: Base,
    data: Annotated[list[Path], typer.Option("--data", help="Dialogue files (repeatable): .jsonl (OpenAI messages, guanaco text, prompt/response), .csv, .parquet.", rich_help_panel=_DATA)],
    output: Output,
    eval_data: EvalData = None,
    eval_fraction: EvalFraction = 0.05,
    max_seq_len: MaxSeqLen = None,
    packing: Annotated[bool, typer.Option("--packing/--padding", help="Pack short dialogues into full rows (no attention across them), or pad one per row.", rich_help_panel=_DATA)] = True,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt for dialogues without one: default, no_system, coding, or the text [default: empty, as StarChat-beta].", rich_help_panel=_DATA)] = None,
    on_bad_record: Annotated[str, typer.Option("--on-bad-record", help="stop: fail at the first malformed record; skip: leave such records out and report the count.", rich_help_panel=_DATA)] = "stop",
    prompt_column: Annotated[Optional[str], typer.Option("--prompt-column", help="CSV/Parquet/JSONL prompt field [default: prompt, instruction, question or input].", rich_help_panel=_DATA)] = None,
    response_column: Annotated[Optional[str], typer.Option("--response-column", help="Response field [default: response, completion, output or answer].", rich_help_panel=_DATA)] = None,
    learning_rate: LearningRate = 2e-5,
    warmup_ratio: WarmupRatio = 0.03,
    global_batch_size: GlobalBatch = 256,
    micro_batch_size: MicroBatch = 4,
    num_epochs: Epochs = 6.0,
    max_steps: MaxSteps = None,
    weight_decay: WeightDecay = 0.0,
    max_grad_norm: MaxGradNorm = 1.0,
    seed: Seed = 42,
    bf16: Bf16 = False,
    gradient_checkpointing: GradCkpt = False,
    fsdp: Fsdp = False,
    eval_steps: EvalSteps = None,
    save_steps: SaveSteps = None,
    save_total_limit: SaveLimit = 2,
    logging_steps: LoggingSteps = 1,
    save_dtype: SaveDtype = None,
    resume: Resume = False,
    device: Device = "auto",
    lora_r: Annotated[Optional[int], typer.Option("--lora-r", help="Train LoRA adapters of this rank (peft) instead of all weights; merged on save.", rich_help_panel=_LORA)] = None,
    lora_alpha: Annotated[Optional[float], typer.Option("--lora-alpha", help="LoRA scaling numerator [default: 2 x rank].", rich_help_panel=_LORA)] = None,
    lora_dropout: Annotated[float, typer.Option("--lora-dropout", rich_help_panel=_LORA)] = 0.05,
    progress: Progress = True,
) -> None:
    """Supervised fine-tuning on dialogues in StarChat's format (loss on assistant tokens only)."""
    from starchat.train.lora import LoraSettings
    from starchat.train.sft import SFTOptions, run_sft

    try:
        lora_settings = LoraSettings(lora_r, lora_alpha, lora_dropout) if lora_r is not None else None
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    training = _training_arguments(
        output, learning_rate=learning_rate, warmup_ratio=warmup_ratio, global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size, num_epochs=num_epochs, max_steps=max_steps, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, seed=seed, bf16=bf16, gradient_checkpointing=gradient_checkpointing, fsdp=fsdp,
        eval_steps=eval_steps, save_steps=save_steps, save_total_limit=save_total_limit, logging_steps=logging_steps,
        save_dtype=save_dtype, resume=resume, device=device, progress=progress)
    options = SFTOptions(base=base, data=list(data), training=training, eval_data=list(eval_data or []),
                         eval_fraction=eval_fraction, max_seq_len=max_seq_len, packing=packing, system=system,
                         on_bad_record=on_bad_record, prompt_column=prompt_column, response_column=response_column,
                         lora=lora_settings)
    _run(run_sft, options)


@train_app.command("pretrain")
def pretrain_command(
    base: Annotated[str, typer.Option("--base", help="Starting weights: a model folder (e.g. a random one from tools/build_starchat_nano.py) or a Hub id.")],
    data: Annotated[list[Path], typer.Option("--data", help="Code files or folders (repeatable), walked recursively.", rich_help_panel=_DATA)],
    output: Output,
    eval_data: EvalData = None,
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", help="Share of files held out for eval loss when no --eval-data.", rich_help_panel=_DATA)] = 0.05,
    extensions: Annotated[str, typer.Option("--extensions", help="Comma-separated file extensions read from folders.", rich_help_panel=_DATA)] = ".py",
    max_seq_len: MaxSeqLen = None,
    learning_rate: LearningRate = 2e-5,
    warmup_ratio: WarmupRatio = 0.03,
    global_batch_size: GlobalBatch = 256,
    micro_batch_size: MicroBatch = 4,
    num_epochs: Epochs = 1.0,
    max_steps: MaxSteps = None,
    weight_decay: WeightDecay = 0.0,
    max_grad_norm: MaxGradNorm = 1.0,
    seed: Seed = 42,
    bf16: Bf16 = False,
    gradient_checkpointing: GradCkpt = False,
    fsdp: Fsdp = False,
    eval_steps: EvalSteps = None,
    save_steps: SaveSteps = None,
    save_total_limit: SaveLimit = 2,
    logging_steps: LoggingSteps = 1,
    save_dtype: SaveDtype = None,
    resume: Resume = False,
    device: Device = "auto",
    progress: Progress = True,
) -> None:
    """Causal-LM training on raw code files (files concatenated, cut into rows, loss on every token)."""
    from starchat.train.pretrain import PretrainOptions, run_pretrain

    training = _training_arguments(
        output, learning_rate=learning_rate, warmup_ratio=warmup_ratio, global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size, num_epochs=num_epochs, max_steps=max_steps, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, seed=seed, bf16=bf16, gradient_checkpointing=gradient_checkpointing, fsdp=fsdp,
        eval_steps=eval_steps, save_steps=save_steps, save_total_limit=save_total_limit, logging_steps=logging_steps,
        save_dtype=save_dtype, resume=resume, device=device, progress=progress)
    suffixes = tuple(s if s.startswith(".") else f".{s}" for s in (part.strip() for part in extensions.split(",")) if s)
    options = PretrainOptions(base=base, data=list(data), training=training, eval_data=list(eval_data or []),
                              eval_fraction=eval_fraction, extensions=suffixes, max_seq_len=max_seq_len)
    _run(run_pretrain, options)


if __name__ == "__main__":  # `python -m starchat.cli.train ...`, and `torchrun -m starchat.cli.train ...`
    train_app()
