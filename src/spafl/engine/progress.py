"""A one-line progress display for long runs (stderr; redrawn on a terminal, periodic lines in logs)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=None) -> None:
        self.total = total
        self.start = start
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.began = time.perf_counter()
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(1, (total - start) // 20)

    def update(self, round_number: int, accuracy: float, density: float, gbit: float) -> None:
        if not self.enabled:
            return
        done = round_number - self.start
        elapsed = time.perf_counter() - self.began
        remaining = elapsed / done * (self.total - round_number) if done > 0 else 0.0
        width = 24
        filled = int(width * round_number / self.total)
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"[{bar}] round {round_number}/{self.total}  acc {accuracy:5.2f}%  density {density:.3f}  "
            f"{gbit:.4g} Gbit  {elapsed:.0f}s elapsed, ~{remaining:.0f}s left"
        )
        if self.interactive:
            self.stream.write("\r" + line)
            if round_number == self.total:
                self.stream.write("\n")
        elif round_number == self.total or done % self.every == 0:
            self.stream.write(line + "\n")
        self.stream.flush()
