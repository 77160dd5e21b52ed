"""Clean-up (`gc`): what no pointer needs goes, under the run lock (so no run is writing): committed runs beyond
the newest K that no pointer names, runs that never committed (a crash, a deadline), objects inside kept runs
that their manifest does not list (a failed attempt's writes), interrupted local writes, and run records
beyond the newest `history_keep` (status/history/). With `older_than_s`, only what is older than that."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import SafeMergeError
from ..io import TMP_PREFIX, Dir, read_json
from .layout import HISTORY, REPORT, RUNS, manifest_key, published_names, read_pointer, run_prefix, run_time, utc_now
from .lock import RunLock
from .records import RecordKind, RunRecord, write_run_record


@dataclass
class GarbageReport:
    removed_runs: list[str] = field(default_factory=list)  # "RUN (committed|uncommitted)"
    leftovers: list[str] = field(default_factory=list)  # objects outside any manifest in kept runs, temp files
    kept_runs: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)  # run records beyond the newest `history_keep`
    objects: int = 0  # objects removed in all


HISTORY_KEEP = 400  # run records kept by default: more than a year of nights


def collect_garbage(out: Dir, keep: int, older_than_s: float | None = None, dry_run: bool = False,
                    break_lock: bool = False, history_keep: int = HISTORY_KEEP) -> GarbageReport:
    if keep < 0 or history_keep < 0:
        raise SafeMergeError("gc: --keep and --history-keep must be 0 or more")
    report = GarbageReport()
    lock = None if dry_run else RunLock(out).acquire(break_lock=break_lock)
    try:
        now = time.time()

        def old_enough(stamp: str) -> bool:  # a run id or a record's name starts with its UTC start time
            started = run_time(stamp)
            return older_than_s is None or (started is not None and now - started >= older_than_s)

        runs = sorted(out.child(RUNS).subdirs())
        committed = {r: m for r in runs if (m := read_json(out, manifest_key(r))) is not None}
        doomed = _runs_no_pointer_needs(out, runs, committed, keep, old_enough, report)
        report.leftovers = _leftovers(out, report.kept_runs, committed, old_enough)
        records = sorted(out.child(HISTORY).list())
        report.records = [f"{HISTORY}{r}" for r in records[:max(0, len(records) - history_keep)] if old_enough(r)]
        doomed += report.leftovers + report.records
        report.objects = len(doomed)
        if not dry_run:  # every gc leaves a record, also one that found nothing to remove
            assert lock is not None
            lock.confirm()
            out.delete(doomed)
            _record(out, report)
        return report
    finally:
        if lock is not None:
            lock.release()


def _runs_no_pointer_needs(out: Dir, runs: list[str], committed: dict[str, dict], keep: int,
                           old_enough: Callable[[str], bool], report: GarbageReport) -> list[str]:
    """The objects of every run no pointer names, beyond the newest `keep` committed ones (and old enough);
    the runs kept go to `report.kept_runs`."""
    pointed = {str(p.get("run_id")) for name in published_names(out) if (p := read_pointer(out, name)) is not None}
    newest = set(sorted(committed)[-keep:]) if keep else set()
    doomed: list[str] = []
    for run_id in runs:
        if run_id in pointed or run_id in newest or not old_enough(run_id):
            report.kept_runs.append(run_id)
            continue
        report.removed_runs.append(f"{run_id} ({'committed' if run_id in committed else 'uncommitted'})")
        doomed += out.walk(run_prefix(run_id))
    return doomed


def _leftovers(out: Dir, kept_runs: list[str], committed: dict[str, dict], old_enough: Callable[[str], bool]
               ) -> list[str]:
    """Objects inside kept committed runs that their manifest does not list (a failed attempt's writes), and
    interrupted local writes anywhere."""
    found: list[str] = []
    for run_id in kept_runs:
        manifest = committed.get(run_id)
        if manifest is None or not old_enough(run_id):
            continue  # uncommitted but young (older_than) or pointed at: left alone
        listed = {manifest_key(run_id), f"{run_prefix(run_id)}{REPORT}", *manifest.get("objects", {})}
        for entry in manifest.get("adapters", {}).values():
            listed.update(entry.get("objects", {}))
        found += [k for k in out.walk(run_prefix(run_id)) if k not in listed]
    if out.local_path is not None:  # interrupted writes and the preflight's debris, anywhere (S3 has none)
        found += [k for k in out.walk() if k.rsplit("/", 1)[-1].startswith(
            (TMP_PREFIX, ".lock-stale-", ".preflight-")) and not k.startswith(RUNS)]
    return found


def _record(out: Dir, report: GarbageReport) -> None:
    record = RunRecord(started_at=utc_now(), output=out.uri, config="", kind=RecordKind.GC)
    record.warnings = [f"gc: removed run {r}" for r in report.removed_runs][:100] + (
        [f"gc: removed {len(report.leftovers)} leftover object(s) in kept runs"] if report.leftovers else []) + (
        [f"gc: removed {len(report.records)} run record(s) beyond the newest kept"] if report.records else []
    ) or ["gc: nothing to remove"]
    record.ended_at = utc_now()
    write_run_record(out, record)
