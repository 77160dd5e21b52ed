"""Run records: every fleet run, including one with nothing to do or one that stopped on an error, leaves a
small record: `status/last_run.json` (what alerting reads) and one file per run under `status/history/`.
Rollbacks and clean-ups leave one in the history too."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from .. import __version__
from ..io import Dir, json_bytes
from .layout import HISTORY, LAST_RUN


class RecordKind(StrEnum):
    FLEET = "fleet"  # a fleet run (the only kind `last_run.json` shows)
    ROLLBACK = "rollback"  # an operator moved a pointer
    GC = "gc"  # old runs removed


_MAX_LISTED_FAILURES = 100  # a record stays small however many adapters fail
_MAX_REASON = 500


@dataclass
class RunRecord:
    started_at: str
    output: str
    config: str
    ended_at: str = ""
    run_id: str | None = None  # None: nothing was committed (nothing to do, or an error)
    exit_status: int = 0
    error: str | None = None
    counts: dict[str, int] = field(default_factory=dict)  # adapters by status
    failed: dict[str, str] = field(default_factory=dict)  # adapter -> reason (the first 100)
    held: dict[str, str] = field(default_factory=dict)  # adapter -> why the gate held it back (the first 100)
    warnings: list[str] = field(default_factory=list)  # skipped directories, unused overrides (the first 100)
    tracked_run: str | None = None  # the run's MLflow run id, when it was tracked
    phase_s: dict[str, float] = field(default_factory=dict)  # a fleet run's seconds per phase (plan, score, ...)
    tool_version: str = __version__
    kind: str = RecordKind.FLEET

    @property
    def key(self) -> str:
        stamp = self.started_at.replace("-", "").replace(":", "")
        return f"{HISTORY}{stamp}-{self.run_id or 'no-run'}-{uuid.uuid4().hex[:6]}.json"

    def to_dict(self) -> dict:
        return {"tool": "safemerge-ray", **asdict(self)}

    def set_failed(self, reasons: dict[str, str]) -> None:
        self.failed = bounded(reasons)

    def set_held(self, reasons: dict[str, str]) -> None:
        self.held = bounded(reasons)


def bounded(reasons: dict[str, str]) -> dict[str, str]:
    """The first 100 adapters' reasons, each cut short: a record stays small however many there are."""
    names = sorted(reasons)
    listed = {n: reasons[n][:_MAX_REASON] for n in names[:_MAX_LISTED_FAILURES]}
    if len(names) > _MAX_LISTED_FAILURES:
        listed["..."] = f"and {len(names) - _MAX_LISTED_FAILURES} more; see the run's summary.json"
    return listed


def write_run_record(out: Dir, record: RunRecord) -> None:
    """The history entry first, then (for a fleet run) `last_run.json`, which alerting reads."""
    data = json_bytes(record.to_dict())
    out.write(record.key, data)
    if record.kind == RecordKind.FLEET:  # a rollback must not look like a night that ran
        out.write(LAST_RUN, data)
