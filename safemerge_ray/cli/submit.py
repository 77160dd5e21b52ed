"""`safemerge-ray submit`: run the fleet job on a standing Ray cluster through Ray's job API, and exit
with the fleet's own status.

`ray job submit` turns every non-zero exit status into 1, so a night with one broken adapter looks like
a night where nothing worked. Here the config is read and checked on the submitting side (its local
paths made absolute), travels with the job beside this package (so the cluster runs the submitter's
version), and the job prints its run record as one log line, from which the exit status is taken.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ..errors import EnvironmentFailure, SafeMergeError, first_line
from ..fleet import portable_config
from .records import emit_record, find_record

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def build_runtime_env(job_dir: str, extra: dict | None) -> dict:
    """The job's working dir (its config) and this package, plus the user's env_vars, pip, ..."""
    extra = dict(extra or {})
    for key in ("working_dir", "py_modules"):
        if key in extra:
            raise SafeMergeError(f"--runtime-env-json: {key} is set by submit (the config and this package)")
    package = str(Path(__file__).resolve().parent.parent)
    return {**extra, "working_dir": job_dir, "py_modules": [package]}


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # unreachable, wrong token, not a Ray dashboard: all environment
        raise EnvironmentFailure(f"cannot reach the Ray job API at {address}: {first_line(exc)}") from None


def submit_fleet(config_path: str, *, address: str | None, runtime_env: dict | None, timeout: float | None,
                 summary_json: str | None, quiet: bool, poll_s: float = 2.0, break_lock: bool = False) -> int:
    _, text = portable_config(config_path)  # a bad config fails here, before anything is submitted
    if quiet:  # Ray's job client says INFO about every package it uploads
        logging.getLogger("ray").setLevel(logging.WARNING)
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    client = _client(address)
    submission_id = f"safemerge-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    try:
        with tempfile.TemporaryDirectory(prefix="safemerge-job-") as job_dir:
            (Path(job_dir) / "fleet.yaml").write_text(text)
            _submit(client, address, submission_id, build_runtime_env(job_dir, runtime_env), break_lock)
        print(f"submitted {submission_id} to {address}", file=sys.stderr, flush=True)
        status, logs = _wait(client, submission_id, timeout, quiet, poll_s)
    except KeyboardInterrupt:  # the job may exist already: it must not run on unattended
        _stop(client, submission_id)
        print(f"safemerge-ray: interrupted; asked Ray to stop {submission_id}", file=sys.stderr)
        raise
    record = find_record(logs)
    if record is None:
        try:
            why = (client.get_job_info(submission_id).message or "").strip().splitlines()
        except Exception:
            why = []
        raise EnvironmentFailure(f"job {submission_id} ended {status} without a run record"
                                 + (f": {why[-1][:300]}" if why else "") + f" (see `ray job logs {submission_id}`)")
    if summary_json:
        emit_record(record, summary_json, record_line=False)
    counts = record.get("counts") or {}
    print(f"job {submission_id}: exit status {record['exit_status']}"
          + (f" ({', '.join(f'{k} {v}' for k, v in counts.items())})" if counts else "")
          # the whole error when the log was not shown; its first line when it was, just above
          + (f": {record['error'] if quiet else record['error'].splitlines()[0]}" if record.get("error") else ""),
          file=sys.stderr, flush=True)
    return int(record["exit_status"])


def _stop(client, submission_id: str) -> None:
    try:
        client.stop_job(submission_id)
    except Exception:  # best effort: the job may have ended, or the API gone; the caller reports
        pass


def _submit(client, address: str, submission_id: str, runtime_env: dict, break_lock: bool,
            patience_s: float = 60.0) -> None:
    """Submit; a cluster that has just started answers 'No available agent' for a while: retry that."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            # The job's log is streamed here: text for a person at a terminal, JSON lines for a log pipeline.
            log_format = "text" if sys.stdout.isatty() else "json"
            client.submit_job(entrypoint="python -m safemerge_ray fleet --config fleet.yaml --record-line "
                              f"--log-format {log_format}" + (" --break-lock" if break_lock else ""),
                              runtime_env=runtime_env, submission_id=submission_id)
            return
        except Exception as exc:
            text = str(exc).strip()
            if "try again later" in text and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise EnvironmentFailure(f"submitting to {address} failed: {text[:300]}") from None


def _wait(client, submission_id: str, timeout: float | None, quiet: bool, poll_s: float,
          patience_s: float = 120.0) -> tuple[str, str]:
    """Follow the job until it ends (or `timeout`, then stop it); returns (status, whole log).

    The job API may be unreachable for a while (a head pod restarting): polls fail quietly for up to
    `patience_s` in a row, then the job counts as lost (exit 1)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    shown = 0
    last_contact = time.monotonic()
    while True:
        try:
            status = str(client.get_job_status(submission_id)).rsplit(".", 1)[-1]
            # The whole log each time: follow it only when it is shown, else fetch it once at the end.
            logs = client.get_job_logs(submission_id) if not quiet or status in TERMINAL else ""
            last_contact = time.monotonic()
        except Exception as exc:  # connection refused, 5xx, ...: the cluster, not the user
            if time.monotonic() - last_contact > patience_s:
                raise EnvironmentFailure(f"lost contact with the Ray job API for {patience_s:.0f} s while following "
                                         f"{submission_id}: {first_line(exc, 200)}") from None
            time.sleep(poll_s)
            continue
        if not quiet and len(logs) > shown:
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
        if status in TERMINAL:
            return status, logs
        if deadline is not None and time.monotonic() > deadline:
            _stop(client, submission_id)
            raise EnvironmentFailure(f"job {submission_id} did not end within {timeout:.0f} s (--timeout); "
                                     "asked Ray to stop it")
        time.sleep(poll_s)
