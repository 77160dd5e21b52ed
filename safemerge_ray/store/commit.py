"""Commits: how written bytes become visible.

`merge` output: a local directory appears whole (one rename); an S3 prefix gets its summary last (a prefix
without `summary.json` is not a finished output). A fleet run: its adapters are written staged and verified;
`commit_run` unstages them, writes the run's files, the manifest (the commit point) and then the pointers.
`rollback` moves one pointer back to an earlier run, after re-verifying every byte of it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import EnvironmentFailure, SafeMergeError
from ..io import Dir, LocalDir, S3Dir, S3Settings, json_bytes, read_json
from .layout import (
    SUMMARY,
    check_run_id,
    key_uri,
    manifest_key,
    missing_run,
    pointer_bytes,
    pointer_key,
    run_prefix,
    utc_now,
)
from .lock import RunLock
from .records import RecordKind, RunRecord, bounded, write_run_record
from .verify import verify_objects, write_verified


def _is_our_output(d: Dir) -> bool:
    return (read_json(d, SUMMARY) or {}).get("tool") == "safemerge-ray"


def check_output_target(out: str, s3: S3Settings = S3Settings()) -> Dir:
    """Refuse before any work if OUT holds something that is not an earlier safemerge-ray output."""
    if out.startswith("s3://"):
        d: Dir = S3Dir(out, s3)
        occupied = bool(d.list() or d.subdirs())
    else:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise SafeMergeError(f"output: {path} exists and is not a directory")
        if not path.parent.exists():
            raise SafeMergeError(f"output: parent directory {path.parent} does not exist")
        d = LocalDir(path)
        occupied = path.is_dir() and any(path.iterdir())
    if occupied and not _is_our_output(d):
        raise SafeMergeError(f"output: {d.uri} is not empty and is not a safemerge-ray output; refusing to replace it")
    return d


def commit_files(out: Dir, files: dict[str, bytes], last: str = SUMMARY) -> None:
    """Write `files` so that a reader sees all of them or (by `last`'s absence) none."""
    out.write_all(files, last)


@dataclass(frozen=True)
class Published:
    """One adapter a run publishes: its written objects ({key: {sha256, bytes, version}}) and what they
    were made from (so that a later run can tell whether they are still right)."""

    name: str
    uri: str
    fingerprint: str
    run_key: str
    settings: dict
    objects: dict[str, dict]
    why: list[str] = field(default_factory=list)  # why this run redid it ("new", "adapter changed", ...)


def commit_run(out: Dir, run_id: str, inputs: dict, adapters: list[Published], run_files: dict[str, bytes],
               failed: dict[str, str], held: dict[str, str] | None = None,
               on_committed: Callable[[], None] | None = None) -> str:
    """Commit a run whose adapters are written (staged and verified): its run-level files (verified),
    every object unstaged, the manifest (the commit point), then one pointer per adapter. Returns the
    commit time. A crash before the manifest leaves the old pointers; after it, a rerun rewrites them."""
    now = utc_now()
    prefix = run_prefix(run_id)
    run_objects = {f"{prefix}{name}": write_verified(out, f"{prefix}{name}", data, staged=True)
                   for name, data in run_files.items()}
    manifest = {
        "tool": "safemerge-ray", "version": __version__, "run_id": run_id, "committed_at": now, "inputs": inputs,
        "adapters": {a.name: {"uri": a.uri, "fingerprint": a.fingerprint, "run_key": a.run_key,
                              "settings": a.settings, "objects": a.objects, "why": a.why} for a in adapters},
        "objects": run_objects,
        "failed": bounded(failed),  # the first 100; the run's summary.json lists every adapter
        "held": bounded(held or {}),  # written but held back by the gate: not published, pointers unmoved
    }
    with ThreadPoolExecutor(max_workers=16) as pool:  # S3 round trips, one per object
        list(pool.map(out.unstage, [key for a in adapters for key in a.objects] + list(run_objects)))
    out.write(manifest_key(run_id), json_bytes(manifest))
    if on_committed is not None:
        on_committed()
    for a in adapters:
        out.write(pointer_key(a.name), pointer_bytes(a.name, run_id, a.run_key, now))
    return now


def rollback(out: Dir, adapter: str, run_id: str, break_lock: bool = False) -> RunRecord:
    """Point `adapter` back at its output from an earlier committed run, after re-verifying every byte
    of it, under the run lock; the history records it (last_run.json stays the last fleet run's)."""
    check_run_id(run_id, "rollback --to")
    record = RunRecord(started_at=utc_now(), output=out.uri, config="", kind=RecordKind.ROLLBACK)
    lock = RunLock(out).acquire(break_lock=break_lock)
    try:
        manifest = read_json(out, manifest_key(run_id))
        if manifest is None:
            raise SafeMergeError(f"rollback: {key_uri(out, manifest_key(run_id))}: no readable manifest (run {run_id}: "
                                 f"{missing_run(out, run_id)})")
        entry = manifest.get("adapters", {}).get(adapter)
        if not entry:
            raise SafeMergeError(f"rollback: run {run_id} did not commit {adapter}")
        problems = verify_objects(out, entry.get("objects", {}))
        if problems:
            raise EnvironmentFailure(f"rollback: {adapter} in run {run_id} is damaged: {problems[0]}")
        lock.confirm()
        out.write(pointer_key(adapter), pointer_bytes(adapter, run_id, entry["run_key"], manifest["committed_at"],
                                                      rolled_back_at=utc_now()))
        record.run_id = run_id
        record.warnings = [f"rollback: {adapter} now points at run {run_id}"]
        record.ended_at = utc_now()
        write_run_record(out, record)
        return record
    finally:
        lock.release()
