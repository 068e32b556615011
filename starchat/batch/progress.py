"""Job progress: a tqdm bar (rows, tokens/s, ETA) on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time

PROGRESS_MODES = ("auto", "bar", "log", "none")


class Progress:
    def __init__(self, total_rows: int, done_rows: int, mode: str = "auto", log_interval_s: float = 10.0, stream=None,
                 failed_rows: int = 0):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode = mode
        self.total_rows = total_rows
        self.rows = done_rows  # finished, this run and earlier ones
        self.failed = failed_rows  # of the finished rows
        self.tokens_out = 0  # generated in this run
        self.started = time.monotonic()
        self.log_interval_s = log_interval_s
        self._last_log = self.started
        self._run_rows = 0
        self._bar = None

    def start(self) -> None:
        """Start the clocks and show the bar (after the model has loaded)."""
        self.started = self._last_log = time.monotonic()
        if self.mode == "bar" and self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_rows, initial=self.rows, unit="row", file=self.stream, dynamic_ncols=True,
                             smoothing=0.1)

    def add_tokens(self, count: int) -> None:
        self.tokens_out += count

    def add_rows(self, count: int, failed: int = 0) -> None:
        self.rows += count
        self._run_rows += count
        self.failed += failed
        now = time.monotonic()
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.tokens_per_s():.0f} tok/s, {self.failed} failed", refresh=False)
            self._bar.update(count)
        elif self.mode == "log" and now - self._last_log >= self.log_interval_s:
            self._last_log = now
            self.log_line()

    def tokens_per_s(self) -> float:
        return self.tokens_out / max(time.monotonic() - self.started, 1e-9)

    def log_line(self, prefix: str = "batch") -> None:
        elapsed = time.monotonic() - self.started
        percent = 100.0 * self.rows / self.total_rows if self.total_rows else 100.0
        remaining = self.total_rows - self.rows
        rate = self._run_rows / elapsed if elapsed > 0 else 0.0
        eta = f"{_duration(remaining / rate)}" if rate > 0 and remaining > 0 else "-"
        print(f"{prefix}: {self.rows}/{self.total_rows} rows ({percent:.0f}%), {self.failed} failed, "
              f"{self.tokens_per_s():.0f} tok/s, {rate:.1f} rows/s, elapsed {_duration(elapsed)}, ETA {eta}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
