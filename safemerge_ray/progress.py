"""Progress and log lines, for people or for machines.

Text (the default): `[fleet] ...` lines, and progress as a tqdm bar on a terminal or, in a log file, a
line every few seconds. JSON (`--log-format json`): one JSON object per line for every message, every
progress step and every adapter's outcome, each with the run id once there is one. ETAs are measured
from the first finished item, so start-up (workers, the first read) does not inflate them.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import TextIO


@dataclass
class LogSettings:
    format: str = "text"  # text | json
    run_id: str | None = None
    stream: TextIO | None = None  # where log lines go (None: stdout)


LOG = LogSettings()


def configure(log_format: str, stream: TextIO | None = None) -> None:
    if log_format not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {log_format!r}")
    LOG.format, LOG.run_id, LOG.stream = log_format, None, stream


def log(event: str, message: str, stream=None, **fields) -> None:
    """One line: `[event] message`, or a JSON object with the time, the run id and `fields`."""
    stream = stream or LOG.stream or sys.stdout
    if LOG.format == "json":
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, "message": message}
        if LOG.run_id:
            record["run_id"] = LOG.run_id
        print(json.dumps({**record, **fields}, default=str), file=stream, flush=True)
    else:
        print(f"[{event}] {message}", file=stream, flush=True)


class Progress:
    def __init__(self, label: str, total: int, unit: str = "modules", every_s: float = 2.0, stream=None):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.stream = stream or sys.stderr
        self.done = self.bytes = 0
        self.start = self.last = time.monotonic()
        self.first: tuple[float, int] | None = None  # (when, how many) at the first finished item
        self.bar = None
        if LOG.format == "text" and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit=f" {unit}", file=self.stream, dynamic_ncols=True)

    def eta(self, now: float) -> float | None:
        if self.first is None or self.done <= self.first[1]:
            return None  # one item finished says nothing yet about the pace
        when, count = self.first
        return (now - when) / (self.done - count) * (self.total - self.done)

    def advance(self, n: int = 1, nbytes: int = 0) -> None:
        now = time.monotonic()
        self.done += n
        self.bytes += nbytes
        if self.first is None:
            self.first = (now, self.done)
        if self.bar is not None:
            self.bar.update(n)
            if self.done >= self.total:
                self.bar.close()
            return
        if now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        eta, elapsed = self.eta(now), now - self.start
        if LOG.format == "json":
            log(self.label, f"{self.done}/{self.total} {self.unit}", stream=self.stream, done=self.done,
                total=self.total, bytes_read=self.bytes, elapsed_s=round(elapsed, 1),
                eta_s=None if eta is None else round(eta, 1))
            return
        read = f", {self.bytes / 1e6:.0f} MB read" if self.bytes else ""
        print(f"[{self.label}] {self.done}/{self.total} {self.unit}{read}, {elapsed:.1f}s elapsed, "
              f"ETA {'?' if eta is None else f'{eta:.1f}s'}", file=self.stream, flush=True)
