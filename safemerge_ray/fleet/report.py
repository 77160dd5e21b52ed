"""What a fleet run reports: its adapters' outcomes, its exit status, and the table a person reads."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from ..errors import ExitStatus
from ..store import RunRecord, run_prefix
from .plan import AdapterState, AdapterStatus

MAX_FAILED_LINES = 100  # stdout stays readable (and small) when a config names 600k missing adapters


class Phase(StrEnum):
    """A fleet run's phases, in order. Each one's seconds go into the run record (`phase_s`)."""
    PLAN = "plan"  # headers, fingerprints, what is pending, the scoring jobs (the driver)
    RAY = "ray"  # Ray started or joined
    PREFLIGHT = "preflight"  # the workers start and check, from their nodes, every input and the output
    SCORE = "score"  # every module's weights read once, every pending adapter scored against them
    ASSEMBLE = "assemble"  # every repaired adapter decided, merged, written (staged) and verified
    GATE = "gate"  # the optional evaluation of the repaired adapters
    COMMIT = "commit"  # decisions, summary, manifest, then pointers


@dataclass
class PhaseClock:
    """Seconds per phase; a phase entered twice adds up."""
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, phase: Phase) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase.value] = round(self.seconds.get(phase.value, 0.0) + time.perf_counter() - start, 3)

    def line(self) -> str:
        return ", ".join(f"{phase} {s:.1f} s" for phase, s in self.seconds.items())


@dataclass
class FleetReport:
    run_id: str | None
    output: str
    adapters: list[AdapterState]
    exit_code: int
    warnings: list[str] = field(default_factory=list)
    bytes_read: int = 0  # by the driver and every worker process, measured in each
    record: RunRecord | None = None

    def by_status(self, status: AdapterStatus) -> list[str]:
        return [a.ref.name for a in self.adapters if a.status == status]

    def listed(self) -> tuple[list[AdapterState], int]:
        """The adapters a report lists (every one but failed ones past MAX_FAILED_LINES), and how many
        failed ones it leaves out: output stays small when a config names 600k missing adapters."""
        shown, failed = [], 0
        for st in self.adapters:
            failed += st.status == AdapterStatus.FAILED
            if st.status != AdapterStatus.FAILED or failed <= MAX_FAILED_LINES:
                shown.append(st)
        return shown, max(0, failed - MAX_FAILED_LINES)


def exit_status(states: list[AdapterState]) -> ExitStatus:
    """0: every adapter is usable (committed or unchanged); 3: some failed or were held back by the gate;
    4: none is usable; 1: none is usable and every failure was the environment's (an S3 outage, a full disk)."""
    failed = [st for st in states if st.status in (AdapterStatus.FAILED, AdapterStatus.HELD)]
    if not failed:
        return ExitStatus.OK
    if len(failed) < len(states):
        return ExitStatus.PARTIAL
    return ExitStatus.ENVIRONMENT if all(st.environment for st in failed) else ExitStatus.FAILED


def format_report(report: FleetReport) -> str:
    lines = [f"{'adapter':<20} {'status':<10} {'repaired':>9}  detail"]
    shown, left_out = report.listed()
    for st in shown:
        repaired = f"{st.counts['repaired']}/{st.counts['modules']}" if st.counts else "-"
        detail = st.reason if st.status in (AdapterStatus.FAILED, AdapterStatus.HELD) else (
            f"run {st.previous_run}" if st.status == AdapterStatus.UNCHANGED else "; ".join(st.why))
        lines.append(f"{st.ref.name:<20} {st.status:<10} {repaired:>9}  {detail}")
    if left_out:
        where = f"{run_prefix(report.run_id)}summary.json" if report.run_id else "status/last_run.json (the first 100)"
        lines.append(f"... and {left_out} more failed adapters: see {where}")
    for w in report.warnings[:MAX_FAILED_LINES]:
        lines.append(f"warning: {w}")
    if len(report.warnings) > MAX_FAILED_LINES:
        lines.append(f"... and {len(report.warnings) - MAX_FAILED_LINES} more warnings")
    if report.run_id:
        lines.append(f"run {report.run_id}: {report.output.rstrip('/')}/{run_prefix(report.run_id)} "
                     f"({report.bytes_read / 1e6:.0f} MB read)")
    elif report.by_status(AdapterStatus.FAILED):
        lines.append(f"nothing committed: {len(report.by_status(AdapterStatus.UNCHANGED))} unchanged, "
                     f"{len(report.by_status(AdapterStatus.FAILED))} failed (their previous pointers stay) in "
                     f"{report.output}")
    else:
        lines.append(f"nothing to do: every adapter is up to date in {report.output}")
    return "\n".join(lines)
