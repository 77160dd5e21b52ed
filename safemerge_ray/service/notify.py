"""A finished run's reports: its metrics pushed, its run tracked, and (fleet) the `on_publish` command. Each is
bounded in time, and none of them can fail the run: what went wrong comes back as a warning."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import ExitStatus, SafeMergeError, TimedOut, call_within, first_line
from .metrics import push_metrics
from .sections import Command, MetricsSection, RunOutcome, TrackedRun, TrackingSection
from .tracking import track_run


class Reported:
    """What the reports did: warnings for the run record, and the tracked run's id."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.tracked_run: str | None = None


def report_run(metrics: MetricsSection | None, tracking: TrackingSection | None, outcome: RunOutcome,
               tracked: Callable[[], TrackedRun] | None = None) -> Reported:
    """Push the metrics and log the run (`tracked` builds what is logged, only when a tracker is set)."""
    done = Reported()
    if metrics is not None:
        problem = _bounded(lambda: push_metrics(metrics, outcome), metrics.timeout_s)
        if problem:
            done.warnings.append(f"metrics: not pushed to {metrics.pushgateway}: {problem}")
    if tracking is not None:
        result: list[str] = []

        def track() -> None:  # what is tracked is built in the bounded call too: nothing here fails the run
            result.append(track_run(tracking, tracked() if tracked else TrackedRun(outcome.command, outcome)))

        problem = _bounded(track, tracking.timeout_s)
        if problem:
            done.warnings.append(f"tracking: run not logged to {tracking.mlflow}: {problem}")
        done.tracked_run = result[0] if result else None
    return done


@dataclass
class CommandRun:
    """A command's run while it goes on: it names what its tracked run holds once it knows."""

    command: Command
    started: float
    run_id: str | None = None
    tracked: Callable[[RunOutcome], TrackedRun] | None = None


@contextmanager
def reporting(command: Command, metrics: MetricsSection | None,
              tracking: TrackingSection | None) -> Iterator[CommandRun]:
    """Report a command's run (`train-safety`, `eval`) whatever its outcome; warnings go to stderr."""
    run = CommandRun(command, time.time())
    status: int = ExitStatus.ENVIRONMENT  # a bug: reported as a failure, and raised
    error: str | None = None
    try:
        yield run
        status = ExitStatus.OK
    except SafeMergeError as exc:
        status, error = exc.exit_code, str(exc)
        raise
    except KeyboardInterrupt:
        status, error = ExitStatus.INTERRUPTED, "interrupted"
        raise
    finally:
        if metrics is not None or tracking is not None:
            outcome = RunOutcome(command, run.started, status, run_id=run.run_id, error=error)
            tracked = run.tracked if status == ExitStatus.OK else None
            done = report_run(metrics, tracking, outcome, (lambda: tracked(outcome)) if tracked else None)
            for warning in done.warnings:
                print(f"warning: {warning}", file=sys.stderr, flush=True)


def run_on_publish(command: tuple[str, ...], record: dict, timeout_s: float = 300.0) -> str | None:
    """The fleet's `on_publish` command with the run record as JSON on stdin: None, or why it failed."""
    try:
        done = subprocess.run(command, input=json.dumps(record, sort_keys=True).encode(), capture_output=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return f"on_publish: {command[0]} did not finish within {timeout_s:g} s"
    except OSError as exc:
        return f"on_publish: {command[0]} could not start: {exc}"
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return f"on_publish: {command[0]} exited with status {done.returncode}" + (f": {tail[0][:300]}"
                                                                                   if tail[0] else "")
    return None


def _bounded(call: Callable[[], object], seconds: float) -> str | None:
    """None when call() finished within `seconds`, else why not: a report never fails the run."""
    try:
        call_within(call, seconds, "the report")
    except TimedOut:
        return f"no answer within {seconds:g} s"
    except Exception as exc:  # noqa: BLE001  # any failure to report is a warning, never the run's failure
        return f"{type(exc).__name__}: {first_line(exc)}"
    return None
