"""The plan of a run: its arguments, the order rows are seen in, and the learning-rate schedule.

Everything here is a pure function of the arguments and the seed, which is what lets one process
and torchrun agree, and `--resume` continue exactly.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from starchat.train import checkpoint as ckpt
from starchat.train.collate import Row


@dataclass
class TrainingArguments:
    """StarChat-beta's published recipe as defaults: AdamW lr 2e-5, cosine, 3% warm-up, 256 sequences, seed 42."""

    output_dir: Path
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.03
    global_batch_size: int = 256
    micro_batch_size: int = 4
    num_epochs: float = 6.0
    max_steps: int | None = None  # overrides num_epochs
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    fsdp: bool = False
    eval_steps: int | None = None  # None: ten evaluations over the run (and one at the end)
    save_steps: int | None = None  # None: as eval_steps; 0: no intermediate checkpoints
    save_total_limit: int = 2
    logging_steps: int = 1
    save_dtype: str | None = None  # None: the base's dtype
    resume: bool = False
    progress: bool = True
    device: str = "auto"

    def validate(self, world_size: int) -> int:
        """Check the numbers; return the gradient-accumulation steps per process."""
        for name in ("global_batch_size", "micro_batch_size", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning-rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max-steps must be at least 1, got {self.max_steps}")
        if self.max_steps is None and self.num_epochs <= 0:
            raise ValueError(f"num-epochs must be > 0, got {self.num_epochs}")
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global-batch-size {self.global_batch_size} is not a multiple of micro-batch-size x processes "
                f"({self.micro_batch_size} x {world_size} = {per_step}); change one of them"
            )
        if self.save_dtype is not None:
            ckpt.dtype_from_name(self.save_dtype)
        return self.global_batch_size // per_step


class GlobalBatchSampler:
    """Row indices of each step's global batch: seeded per-epoch permutations, laid end to end."""

    def __init__(self, num_rows: int, global_batch_size: int, seed: int):
        if num_rows < 1:
            raise ValueError("no training rows: the data is empty after tokenization")
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._orders = {epoch: torch.randperm(self.num_rows, generator=generator).tolist()}  # keep one epoch
        return self._orders[epoch]

    def global_batch(self, step: int) -> list[int]:
        start = step * self.global_batch_size
        return [self._order(position // self.num_rows)[position % self.num_rows]
                for position in range(start, start + self.global_batch_size)]

    def epoch_at(self, step: int) -> float:
        return step * self.global_batch_size / self.num_rows


def cosine_with_warmup(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the peak, then half a cosine to zero (transformers' get_cosine_schedule_with_warmup)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def rows_fingerprint(rows: Sequence[Row]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(len(row).to_bytes(4, "little"))
        digest.update(b"".join(token.to_bytes(4, "little", signed=True) for token in row.input_ids))
        digest.update(b"".join(label.to_bytes(4, "little", signed=True) for label in row.labels))
    return digest.hexdigest()[:16]


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % (2**32))
    except ImportError:
        pass
