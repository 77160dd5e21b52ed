"""Clean-up (`gc`): what no pointer needs goes, under the run lock (so no run is writing): committed runs beyond
the newest K that no pointer names, runs that never committed (a crash, a deadline), objects inside kept runs
that their manifest does not list (a failed attempt's writes), and interrupted local writes. With
`older_than_s`, only what is older than that."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import SafeMergeError
from ..io import TMP_PREFIX, Dir, LocalDir, read_json
from .layout import LATEST, REPORT, RUNS, manifest_key, run_prefix, run_time, utc_now
from .lock import RunLock
from .records import RecordKind, RunRecord, write_run_record


@dataclass
class GarbageReport:
    removed_runs: list[str] = field(default_factory=list)  # "RUN (committed|uncommitted)"
    leftovers: list[str] = field(default_factory=list)  # objects outside any manifest in kept runs, temp files
    kept_runs: list[str] = field(default_factory=list)
    objects: int = 0  # objects removed in all


def collect_garbage(out: Dir, keep: int, older_than_s: float | None = None, dry_run: bool = False,
                    break_lock: bool = False) -> GarbageReport:
    if keep < 0:
        raise SafeMergeError("gc: --keep must be 0 or more")
    report = GarbageReport()
    lock = None if dry_run else RunLock(out).acquire(break_lock=break_lock)
    try:
        now = time.time()

        def old_enough(run_id: str) -> bool:
            started = run_time(run_id)
            return older_than_s is None or (started is not None and now - started >= older_than_s)

        runs = sorted(out.child(RUNS).subdirs())
        committed = {r: m for r in runs if (m := read_json(out, manifest_key(r))) is not None}
        pointed = {str(p.get("run_id")) for name in out.child(LATEST).list() if name.endswith(".json")
                   if (p := read_json(out, f"{LATEST}{name}")) is not None}
        newest = set(sorted(committed)[-keep:]) if keep else set()
        doomed: list[str] = []
        for run_id in runs:
            if run_id in pointed or run_id in newest or not old_enough(run_id):
                report.kept_runs.append(run_id)
                continue
            report.removed_runs.append(f"{run_id} ({'committed' if run_id in committed else 'uncommitted'})")
            doomed += out.walk(run_prefix(run_id))
        for run_id in report.kept_runs:
            manifest = committed.get(run_id)
            if manifest is None:
                continue  # uncommitted but young (older_than) or pointed at: left alone
            listed = {manifest_key(run_id), f"{run_prefix(run_id)}{REPORT}", *manifest.get("objects", {})}
            for entry in manifest.get("adapters", {}).values():
                listed.update(entry.get("objects", {}))
            if old_enough(run_id):
                report.leftovers += [k for k in out.walk(run_prefix(run_id)) if k not in listed]
        if isinstance(out, LocalDir):  # interrupted writes and the preflight's debris, anywhere (S3 has none)
            report.leftovers += [k for k in out.walk() if k.rsplit("/", 1)[-1].startswith(
                (TMP_PREFIX, ".lock-stale-", ".preflight-")) and not k.startswith(RUNS)]
        doomed += report.leftovers
        report.objects = len(doomed)
        if not dry_run:  # every gc leaves a record, also one that found nothing to remove
            assert lock is not None
            lock.confirm()
            out.delete(doomed)
            record = RunRecord(started_at=utc_now(), output=out.uri, config="", kind=RecordKind.GC)
            record.warnings = [f"gc: removed run {r}" for r in report.removed_runs][:100] + (
                [f"gc: removed {len(report.leftovers)} leftover object(s) in kept runs"] if report.leftovers else []
            ) or ["gc: nothing to remove"]
            record.ended_at = utc_now()
            write_run_record(out, record)
        return report
    finally:
        if lock is not None:
            lock.release()
