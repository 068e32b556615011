"""The optimisation loop shared by `sft` and `pretrain`.

One optimizer step consumes one global batch of `global_batch_size` rows: each of the W processes
takes its slice and runs it as A micro-batches of `micro_batch_size` (W * A * micro = global).
The loss is the sum of token losses divided by the number of loss tokens in the *global* batch
(known to every rank, since each holds the row list), so the gradient does not depend on how the
batch is split over processes and micro-batches: one process and `torchrun` agree.

The row order is fixed by the seed (plan.py). With the optimizer, scheduler and RNG states saved
in each checkpoint, `--resume` continues exactly where the checkpoint was taken.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from starchat.chat_template import DialogueTemplate
from starchat.train import checkpoint as ckpt
from starchat.train import distributed as dist_utils
from starchat.train import lora
from starchat.train.collate import Row, collate
from starchat.train.metrics import TrainingLogger
from starchat.train.model_setup import PreparedModel, export_state_dict
from starchat.train.objective import LossModel
from starchat.train.plan import GlobalBatchSampler, TrainingArguments, cosine_with_warmup, rows_fingerprint, set_seed
from starchat.train.stopping import StopSignals, TrainingInterrupted

__all__ = ["Trainer", "TrainingArguments", "TrainResult", "StepCallback", "begin_run"]

logger = logging.getLogger("starchat.train")


@dataclass
class TrainResult:
    steps: int
    train_loss: float | None
    eval_loss: float | None
    output_dir: Path
    losses: list[float] = field(default_factory=list)  # train loss per step run in this process
    eval_losses: list[tuple[int, float]] = field(default_factory=list)


StepCallback = Callable[[int, dict], None]  # (step just finished, its metrics)


class Trainer:
    def __init__(self, prepared: PreparedModel, train_rows: Sequence[Row], eval_rows: Sequence[Row],
                 args: TrainingArguments, context: dist_utils.DistributedContext, template: DialogueTemplate,
                 callbacks: Sequence[StepCallback] = (), resume_dir: Path | None = None, run_info: dict | None = None):
        self.prepared = prepared
        self.train_rows = list(train_rows)
        self.eval_rows = list(eval_rows)
        self.args = args
        self.context = context
        self.template = template
        self.callbacks = list(callbacks)
        self.resume_dir = resume_dir
        self.run_info = run_info or {}
        self.output_dir = Path(args.output_dir)
        self.accumulation_steps = args.validate(context.world_size)
        self.sampler = GlobalBatchSampler(len(self.train_rows), args.global_batch_size, args.seed)
        if args.max_steps is not None:
            self.total_steps = args.max_steps
        else:
            self.total_steps = max(1, math.ceil(args.num_epochs * len(self.train_rows) / args.global_batch_size))
        self.warmup_steps = math.ceil(args.warmup_ratio * self.total_steps)
        auto_interval = max(1, self.total_steps // 10)
        self.eval_steps = args.eval_steps or auto_interval
        self.save_steps = auto_interval if args.save_steps is None else args.save_steps
        self.fingerprint = {
            "global_batch_size": args.global_batch_size, "seed": args.seed, "learning_rate": args.learning_rate,
            "total_steps": self.total_steps, "num_rows": len(self.train_rows),
            "rows": rows_fingerprint(self.train_rows), "lora_r": prepared.lora_settings.r if prepared.lora_settings else None,
        }
        self.pad_token_id = prepared.tokenizer_backend.token_to_id("<|endoftext|>") or 0
        self.save_dtype = self._resolve_save_dtype()

    def _resolve_save_dtype(self) -> torch.dtype:
        """--save-dtype, else the dtype the base is stored in (its config.json), else float32."""
        name = self.args.save_dtype or self.prepared.base_dtype or "float32"
        return ckpt.DTYPES.get(str(name).removeprefix("torch."), torch.float32)

    # -- setup -------------------------------------------------------------------------------
    def _build(self):
        args, context = self.args, self.context
        model = self.prepared.model
        if args.gradient_checkpointing:
            hf_model = self.prepared.hf_model
            if hasattr(hf_model, "activation_checkpointing_enable"):  # transformers >= 5 name
                hf_model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(context.device)
        model.train()
        if args.fsdp and self.prepared.lora_settings is not None:
            raise ValueError("--fsdp with --lora-r is not supported: LoRA is meant to fit one device per process; use DDP")
        self.model = dist_utils.wrap_model(LossModel(model), context, args.fsdp)
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.parameters = parameters
        self.optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                           eps=args.adam_epsilon, weight_decay=args.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_with_warmup(self.warmup_steps, self.total_steps))
        self.attn_implementation = getattr(self.prepared.hf_config, "_attn_implementation", None) or "sdpa"

    def _restore(self) -> int:
        """Load optimizer, scheduler, RNG and step from resume_dir; return the step to continue from."""
        state = ckpt.load_training_state(self.resume_dir)
        saved = state["fingerprint"]
        changed = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
        if changed:
            shown = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
            raise ValueError(f"{self.resume_dir}: cannot resume, the run differs from the checkpoint's ({shown}); "
                             "resume with the same data and hyper-parameters, or start a new --output")
        if self.prepared.lora_settings is not None:
            lora.load_adapter_state_dict(self.prepared.model, ckpt.load_adapter(self.resume_dir))
        dist_utils.load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng_path = ckpt.rng_file(self.resume_dir, self.context.rank)
        if rng_path.is_file():
            ckpt.restore_rng_state(torch.load(rng_path, weights_only=False))
        return int(state["step"])

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run to the last step; a stop signal ends the run after a whole step, saved
        (TrainingInterrupted)."""
        args, context = self.args, self.context
        self._build()
        start_step = self._restore() if self.resume_dir is not None else 0
        logger = TrainingLogger(self.output_dir, self.total_steps, start_step, enabled=context.is_main,
                                progress=args.progress, resumed=self.resume_dir is not None)
        if context.is_main:
            self._write_run_info()
        result = TrainResult(steps=start_step, train_loss=None, eval_loss=None, output_dir=self.output_dir)
        with StopSignals() as stop:
            self._run_steps(start_step, result, logger, stop)
        return result

    def _run_steps(self, start_step: int, result: TrainResult, logger: TrainingLogger, stop: StopSignals) -> None:
        args = self.args
        try:
            for step in range(start_step, self.total_steps):
                metrics = self._train_step(step)
                result.losses.append(metrics["loss"])
                result.train_loss = metrics["loss"]
                done = step + 1
                logger.advance(metrics)
                if done % args.logging_steps == 0 or done == self.total_steps:
                    logger.log_train(done, metrics)
                if done % self.eval_steps == 0 or done == self.total_steps:
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        result.eval_loss = eval_loss
                        result.eval_losses.append((done, eval_loss))
                        logger.log_eval(done, eval_loss)
                saved = self.save_steps and done % self.save_steps == 0 and done < self.total_steps
                if saved:
                    self.save_checkpoint(done)
                result.steps = done
                for callback in self.callbacks:
                    callback(done, metrics)
                # Every rank stops after the same step (torchrun signals each, not at one moment).
                if done < self.total_steps and dist_utils.all_reduce_sum([float(stop.requested)], self.context)[0]:
                    checkpoint = ckpt.step_dir(self.output_dir, done) if saved else self.save_checkpoint(done)
                    raise TrainingInterrupted(done, self.total_steps, checkpoint)
            self.save_final()
        finally:
            logger.close()

    def _train_step(self, step: int) -> dict:
        args, context = self.args, self.context
        started = time.perf_counter()
        indices = self.sampler.global_batch(step)
        global_rows = [self.train_rows[i] for i in indices]
        loss_tokens = sum(row.num_loss_tokens for row in global_rows)
        per_rank = len(indices) // context.world_size
        mine = global_rows[context.rank * per_rank:(context.rank + 1) * per_rank]
        micro_batches = [mine[i:i + args.micro_batch_size] for i in range(0, len(mine), args.micro_batch_size)]
        # DDP/FSDP average gradients over ranks; scaling by world size turns that average into the global sum.
        scale = context.world_size / max(1, loss_tokens)
        local_loss_sum = 0.0
        for index, rows in enumerate(micro_batches):
            batch = collate(rows, self.pad_token_id).to(context.device)
            with dist_utils.gradient_sync(self.model, enabled=index == len(micro_batches) - 1):
                loss_sum = self._forward_loss_sum(batch)
                (loss_sum * scale).backward()
            local_loss_sum += loss_sum.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, args.max_grad_norm)
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        (total_loss_sum,) = dist_utils.all_reduce_sum([local_loss_sum], context)
        return {
            "loss": total_loss_sum / max(1, loss_tokens),
            "learning_rate": learning_rate,
            "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
            "tokens": sum(len(row) for row in global_rows),
            "loss_tokens": loss_tokens,
            "epoch": self.sampler.epoch_at(step + 1),
            "step_seconds": time.perf_counter() - started,
        }

    def _forward_loss_sum(self, batch) -> torch.Tensor:
        with torch.autocast(device_type=self.context.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            return self.model(batch.input_ids, batch.labels, position_ids=batch.position_ids,
                              attention_mask=batch.model_attention_mask(self.attn_implementation))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-weighted mean loss over the held-out rows (sharded over ranks, summed back).

        Every rank runs the same number of forward passes (FSDP gathers parameters in each one);
        a rank whose shard is shorter repeats a row and does not count it.
        """
        if not self.eval_rows:
            return None
        world, micro = self.context.world_size, self.args.micro_batch_size
        mine = self.eval_rows[self.context.rank::world]
        num_batches = math.ceil(math.ceil(len(self.eval_rows) / world) / micro)
        self.model.eval()
        loss_sum, count = 0.0, 0
        try:
            for index in range(num_batches):
                rows = mine[index * micro:(index + 1) * micro]
                counted = bool(rows)
                batch = collate(rows if counted else self.eval_rows[:1], self.pad_token_id).to(self.context.device)
                batch_loss = self._forward_loss_sum(batch).item()
                if counted:
                    loss_sum += batch_loss
                    count += sum(row.num_loss_tokens for row in rows)
        finally:
            self.model.train()
        loss_sum, count = dist_utils.all_reduce_sum([loss_sum, float(count)], self.context)
        return loss_sum / count if count else None

    # -- saving ------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        """Training weights (full precision) + state; every rank takes part (FSDP gathers shards)."""
        final = ckpt.step_dir(self.output_dir, step)
        temporary = ckpt.temporary_dir(final)
        state_dict = export_state_dict(self.prepared, self.model)
        optimizer_state = dist_utils.full_optimizer_state_dict(self.model, self.optimizer)
        if self.context.is_main:
            if temporary.exists():
                shutil.rmtree(temporary)
            # float32 whatever the save dtype: resuming must start from the exact training weights.
            ckpt.save_model_folder(state_dict, self.prepared.hf_config, temporary, torch.float32,
                                   self.output_dir, self.template)
            if self.prepared.lora_settings is not None:
                ckpt.save_adapter(temporary, lora.adapter_state_dict(self.prepared.model))
        dist_utils.barrier(self.context)  # the folder exists before ranks write their RNG files
        torch.save(ckpt.capture_rng_state(), ckpt.rng_file(temporary, self.context.rank))
        dist_utils.barrier(self.context)
        if self.context.is_main:
            ckpt.save_training_state(temporary, {
                "step": step, "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                "fingerprint": self.fingerprint, "world_size": self.context.world_size,
            })
            ckpt.publish(temporary, final)
            ckpt.prune_checkpoints(self.output_dir, self.args.save_total_limit)
        dist_utils.barrier(self.context)
        return final

    def save_final(self) -> None:
        state_dict = export_state_dict(self.prepared, self.model)
        if self.context.is_main:
            ckpt.save_model_folder(state_dict, self.prepared.hf_config, self.output_dir, self.save_dtype,
                                   self.output_dir, self.template)
        dist_utils.barrier(self.context)

    def _write_run_info(self) -> None:
        info = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.args).items()}
        info.update(self.run_info, world_size=self.context.world_size, accumulation_steps=self.accumulation_steps,
                    total_steps=self.total_steps, warmup_steps=self.warmup_steps, train_rows=len(self.train_rows),
                    eval_rows=len(self.eval_rows))
        (self.output_dir / "training_args.json").write_text(json.dumps(info, indent=2, default=str) + "\n")


def begin_run(args: TrainingArguments) -> tuple[dist_utils.DistributedContext, Path | None]:
    """Process group, seeds, output folder, and the checkpoint to resume from (None: start from the base)."""
    context = dist_utils.init_distributed(args.device)
    args.validate(context.world_size)  # before any data or model is loaded
    set_seed(args.seed)
    args.output_dir = Path(args.output_dir)
    if context.is_main:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    dist_utils.barrier(context)
    resume_dir = ckpt.find_latest_checkpoint(args.output_dir) if args.resume else None
    if args.resume and resume_dir is None:
        logger.warning("--resume: no complete checkpoint under %s; starting from the base", ckpt.checkpoints_dir(args.output_dir))
    elif resume_dir is not None:
        logger.info("resuming from %s", resume_dir)
    return context, resume_dir
