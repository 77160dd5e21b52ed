"""The output store: what is written where, how it becomes visible, and how it is read back.

    layout     where everything lives (runs/, latest/, status/), run ids and adapter names
    decisions  the decision table (decisions.parquet)
    verify     written bytes read back and checked; published objects re-checked
    lock       one run per output at a time, over the `Dir`'s conditional writes
    records    run records: status/last_run.json and status/history/
    commit     merge outputs, a fleet run's commit (manifest, then pointers), rollback
    gc         what no pointer needs, removed under the lock
    history    read-only views: status, runs, diff
"""

from .commit import Published, check_output_target, commit_files, commit_run, rollback
from .decisions import DECISION_SCHEMA, counts, decisions_bytes, decisions_table, read_decisions, table_from_bytes
from .gc import GarbageReport, collect_garbage
from .history import (
    AdapterStatus,
    Decisions,
    NextRun,
    Planned,
    PublishedState,
    committed_runs_of,
    diff_runs,
    fleet_status,
    format_diff,
    format_runs,
    format_status,
    list_runs,
    repaired_rho,
    status_json,
)
from .history import decisions_table as current_decisions_table
from .layout import (
    DECISIONS,
    HISTORY,
    LAST_RUN,
    LATEST,
    LOCK,
    MANIFEST,
    REPORT,
    RUNS,
    SUMMARY,
    VERIFIED,
    adapter_prefix,
    check_adapter_name,
    check_run_id,
    key_uri,
    manifest_key,
    new_run_id,
    pointer_bytes,
    pointer_key,
    published_names,
    read_pointer,
    run_prefix,
    split_versioned_name,
    utc_now,
    versioned_name,
)
from .lock import LEASE_S, LockHeld, RunLock
from .records import RecordKind, RunRecord, write_run_record
from .verify import cached_manifest, published_damage, published_intact, verify_objects, verify_output, write_verified

__all__ = [
    "DECISIONS", "DECISION_SCHEMA", "HISTORY", "LAST_RUN", "LATEST", "LEASE_S", "LOCK", "MANIFEST", "REPORT",
    "RUNS", "SUMMARY", "VERIFIED", "AdapterStatus", "Decisions", "GarbageReport", "LockHeld", "NextRun", "Planned",
    "Published", "PublishedState", "RecordKind", "RunLock", "RunRecord", "adapter_prefix", "cached_manifest",
    "check_adapter_name", "check_output_target", "check_run_id", "collect_garbage", "commit_files", "commit_run",
    "committed_runs_of", "counts", "current_decisions_table", "decisions_bytes", "decisions_table", "diff_runs",
    "fleet_status", "format_diff", "format_runs", "format_status", "key_uri", "list_runs", "manifest_key",
    "new_run_id", "pointer_bytes", "pointer_key", "published_damage", "published_intact", "published_names",
    "read_decisions", "read_pointer", "repaired_rho", "rollback", "run_prefix", "status_json", "table_from_bytes",
    "utc_now",
    "verify_objects", "verify_output", "write_run_record", "write_verified",
    "split_versioned_name", "versioned_name",
]
