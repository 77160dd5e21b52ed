"""The run record as the CLI hands it on: to a file (`--summary-json`), and as one log line that `submit` finds in
the job's log (Ray flattens a job's exit status, so the record carries it)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SafeMergeError

# `submit` finds the run record in the job's log by this prefix.
RECORD_LINE = "safemerge-ray run record: "


def error_record(started: str, config: str, exc: BaseException, status: int):
    """The run record of a run that stopped before its output was known (or was never submitted)."""
    from ..store import RunRecord, utc_now

    return RunRecord(started_at=started, output="", config=config, ended_at=utc_now(), exit_status=status,
                     error=str(exc) or "interrupted")


def emit_record(record: dict, summary_json: str | None, record_line: bool) -> None:
    if summary_json:
        from ..io import LocalDir, json_bytes

        path = Path(summary_json).absolute()
        LocalDir(path.parent).write(path.name, json_bytes(record))
    if record_line:
        print(RECORD_LINE + json.dumps(record, sort_keys=True), flush=True)


def find_record(logs: str) -> dict | None:
    """The last run record the job printed, or None."""
    for line in reversed(logs.splitlines()):
        if line.startswith(RECORD_LINE):
            try:
                return json.loads(line[len(RECORD_LINE):])
            except ValueError:
                return None
    return None


def json_arg(text: str | None, flag: str) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SafeMergeError(f"{flag}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise SafeMergeError(f"{flag}: expected a JSON object, like '{{\"env_vars\": {{...}}}}'")
    return value
