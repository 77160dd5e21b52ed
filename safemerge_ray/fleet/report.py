"""What a fleet run reports: its adapters' outcomes, its exit status, and the table a person reads."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ExitStatus
from ..store import RunRecord, run_prefix
from .plan import AdapterState, AdapterStatus

MAX_FAILED_LINES = 100  # stdout stays readable (and small) when a config names 600k missing adapters


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
