"""Stages that run once: each writes into its own directory and, last, `stage.json` (its result and the
seconds it took). A rerun skips every stage with a `stage.json` and redoes one left half-written."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path


def log(message: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Stages:
    def __init__(self, root: Path):
        self.root = root
        self.ran: list[str] = []  # this run's stages, done now or before (a root holds other profiles' too)
        root.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, work: Callable[[Path], dict]) -> dict:
        place = self.root / name
        done = place / "stage.json"
        self.ran.append(name)
        if done.exists():
            record = json.loads(done.read_text())
            log(f"{name}: done before ({record['seconds']:.0f} s then)")
            return record["result"]
        shutil.rmtree(place, ignore_errors=True)  # a stage stopped halfway starts over
        place.mkdir(parents=True)
        log(f"{name}: running")
        start = time.monotonic()
        result = work(place)
        seconds = time.monotonic() - start
        done.write_text(json.dumps({"result": result, "seconds": round(seconds, 1)}, indent=1))
        log(f"{name}: done in {seconds:.0f} s")
        return result

    def seconds(self) -> dict[str, float]:
        """The time each of this run's stages took when it ran, in the order they run."""
        return {name: json.loads((self.root / name / "stage.json").read_text())["seconds"] for name in self.ran}
