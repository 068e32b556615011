"""What a run tells its user: a progress bar (tokens/s, ETA), JSON-lines logs, TensorBoard when installed.

`<output>/train_log.jsonl` holds one object per logged step ({"step", "loss", "learning_rate",
"grad_norm", "tokens_per_second", ...}) and one per evaluation ({"step", "eval_loss"}). On
resume, records past the checkpoint's step (written by the interrupted run) are dropped, so the
log reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

LOG_FILE_NAME = "train_log.jsonl"


class TrainingLogger:
    def __init__(self, output_dir: Path, total_steps: int, start_step: int, enabled: bool, progress: bool,
                 resumed: bool):
        self.enabled = enabled
        self._started = time.perf_counter()
        self._window_tokens = 0
        self._window_seconds = 0.0  # time in training steps only: evaluations and saves do not count
        self._bar = None
        self._tensorboard = None
        self._log = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        log_path = output_dir / LOG_FILE_NAME
        if resumed and log_path.is_file():
            kept = [line for line in log_path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif log_path.exists():
            log_path.unlink()
        self._log = log_path.open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self._tensorboard = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="training", dynamic_ncols=True)

    def advance(self, metrics: dict) -> None:
        """After every step: the bar moves, with loss, learning rate and throughput as its postfix."""
        self._window_tokens += metrics["tokens"]
        self._window_seconds += metrics["step_seconds"]
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}",
                                  tok_s=f"{metrics['tokens'] / max(metrics['step_seconds'], 1e-9):.0f}", refresh=False)
            self._bar.update(1)

    def log_train(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        tokens_per_second = self._window_tokens / max(self._window_seconds, 1e-9)
        self._window_tokens, self._window_seconds = 0, 0.0
        record = {"step": step, "epoch": round(metrics["epoch"], 4), "loss": metrics["loss"],
                  "learning_rate": metrics["learning_rate"], "grad_norm": metrics["grad_norm"],
                  "tokens": metrics["tokens"], "loss_tokens": metrics["loss_tokens"],
                  "tokens_per_second": round(tokens_per_second, 1), "elapsed_seconds": round(now - self._started, 3)}
        self._write(record)
        if self._tensorboard is not None:
            for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second"):
                self._tensorboard.add_scalar(f"train/{key}", record[key], step)

    def log_eval(self, step: int, eval_loss: float) -> None:
        if not self.enabled:
            return
        self._write({"step": step, "eval_loss": eval_loss})
        if self._bar is not None:
            self._bar.write(f"step {step}: eval loss {eval_loss:.4f}")
        if self._tensorboard is not None:
            self._tensorboard.add_scalar("eval/loss", eval_loss, step)

    def _write(self, record: dict) -> None:
        self._log.write(json.dumps(record) + "\n")
        self._log.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._log is not None:
            self._log.close()
