"""Stopping a training run cleanly: Ctrl-C or SIGTERM (a scheduler's preemption) ends the run
after the optimizer step in progress, saved as a checkpoint that `--resume` continues from.

A second Ctrl-C stops at once (the work since the last checkpoint is lost).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path


class TrainingInterrupted(Exception):
    """The run stopped on a signal after `step` of `total_steps`, saved in `checkpoint`."""

    def __init__(self, step: int, total_steps: int, checkpoint: Path):
        super().__init__(f"interrupted after step {step} of {total_steps}: checkpoint saved in {checkpoint}; "
                         "run the same command with --resume to continue from it")
        self.step, self.total_steps, self.checkpoint = step, total_steps, checkpoint


class StopSignals:
    """While entered (in the main thread), SIGINT and SIGTERM only set `requested`."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def _on_signal(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
