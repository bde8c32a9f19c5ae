"""A one-line progress bar (images/s, loss, LR, ETA) on a terminal, a plain line per ~10% of
the epoch elsewhere (logs, CI). It only prints what the trainer already read back at log steps."""
from __future__ import annotations

import sys
import time


def clock(seconds: float) -> str:
    """h:mm:ss"""
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, title: str, total: int, stream=None, enabled: bool = True, unit: str = "img"):
        self.enabled = enabled  # only rank 0 of a distributed run prints
        self.unit = unit  # what is counted: images for training, files for the data tools
        self.title = title
        self.total = total
        self.stream = stream or sys.stderr  # looked up now: a redirected stderr is honoured
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self._next_plain = 0

    def update(self, done: int, per_sec: float, data: float | None = None, **fields: float) -> None:
        """per_sec: units per second (images/s per GPU in training); data: the share of the time
        spent waiting for the loader."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(done, 1) * (self.total - done)
        text = " ".join(f"{k} {v:.4g}" for k, v in fields.items())
        if data is not None:
            text += f" data {data:.0%}"
        if self.tty:
            width = 24
            fill = int(width * done / max(self.total, 1))
            bar = "#" * fill + "." * (width - fill)
            self.stream.write(f"\r{self.title} [{bar}] {done}/{self.total} {per_sec:,.0f} {self.unit}/s {text} eta {clock(eta)}\033[K")
            self.stream.flush()
        elif done >= self._next_plain or done == self.total:
            self.stream.write(f"{self.title} {done}/{self.total} {per_sec:,.0f} {self.unit}/s {text} eta {clock(eta)}\n")
            self.stream.flush()
            self._next_plain = done + max(1, self.total // 10)

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
