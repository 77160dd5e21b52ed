"""Progress lines for long work: at most one every few seconds, on stderr, with an ETA."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, unit: str = "modules", every_s: float = 2.0, stream=None):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.bytes = 0
        self.start = self.last = time.monotonic()

    def advance(self, n: int = 1, nbytes: int = 0) -> None:
        self.done += n
        self.bytes += nbytes
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            elapsed = now - self.start
            eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            read = f", {self.bytes / 1e6:.0f} MB read" if self.bytes else ""
            print(
                f"[{self.label}] {self.done}/{self.total} {self.unit}{read}, "
                f"{elapsed:.1f}s elapsed, ETA {eta:.1f}s",
                file=self.stream, flush=True,
            )
