"""One run per output at a time: the run lock, locally and on S3 (SeaweedFS), and in the fleet job."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from safemerge_ray.cli import main
from safemerge_ray.errors import ExitStatus
from safemerge_ray.io import LocalDir, S3Dir, S3Settings
from safemerge_ray.store import LOCK, LockHeld, RunLock


def _stale(lock_body: bytes) -> bytes:
    body = json.loads(lock_body)
    body["lease_until"] = time.time() - 1
    return json.dumps(body).encode()


def _exercise(out, read_lock, write_lock) -> None:
    first = RunLock(out, lease_s=60).acquire()
    with pytest.raises(LockHeld, match="is locked by another run .* nothing was done") as exc:
        RunLock(out, lease_s=60).acquire()
    assert exc.value.exit_code == ExitStatus.LOCKED
    first.release()
    second = RunLock(out, lease_s=60).acquire()  # released: free again
    # A run that died: its lease expires, and the next run takes the lock over.
    second._stop.set()
    write_lock(_stale(read_lock()))
    third = RunLock(out, lease_s=60).acquire()
    assert json.loads(read_lock())["owner"] == third.owner
    # The dead run's release must not remove the new owner's lock.
    second.release()
    assert json.loads(read_lock())["owner"] == third.owner
    # An operator can break a live lock.
    fourth = RunLock(out, lease_s=60).acquire(break_lock=True)
    assert json.loads(read_lock())["owner"] == fourth.owner
    fourth.release()
    third.release()


def test_local_lock(tmp_path):
    out = LocalDir(tmp_path / "merged")
    path = tmp_path / "merged" / LOCK
    _exercise(out, path.read_bytes, path.write_bytes)
    assert not path.exists()


def test_s3_lock_and_concurrent_creates(s3_endpoint, s3_client):
    """SeaweedFS enforces `If-None-Match: *`: of 8 simultaneous creates exactly one wins."""
    bucket = "locks"
    if bucket not in {b["Name"] for b in s3_client.list_buckets()["Buckets"]}:
        s3_client.create_bucket(Bucket=bucket)
    prefix = f"{uuid.uuid4().hex[:6]}/merged/"
    out = S3Dir(f"s3://{bucket}/{prefix}", S3Settings(endpoint_url=s3_endpoint))

    def read() -> bytes:
        return s3_client.get_object(Bucket=bucket, Key=prefix + LOCK)["Body"].read()

    def write(data: bytes) -> None:
        s3_client.put_object(Bucket=bucket, Key=prefix + LOCK, Body=data)

    _exercise(out, read, write)

    def try_lock(_):
        try:
            return RunLock(S3Dir(out.uri, out.settings), lease_s=60).acquire()
        except LockHeld:
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        winners = [w for w in pool.map(try_lock, range(8)) if w is not None]
    assert len(winners) == 1
    winners[0].release()


def test_a_second_fleet_run_on_a_locked_output_does_nothing(local_fleet, tmp_path, capsys):
    out = local_fleet / "merged"
    holder = RunLock(LocalDir(out), lease_s=60).acquire()  # another run, still alive
    try:
        summary = tmp_path / "second.json"
        code = main(["fleet", "--config", str(local_fleet / "fleet.yaml"), "--quiet", "--summary-json", str(summary)])
        err = capsys.readouterr().err
        assert code == ExitStatus.LOCKED and err.count("\n") == 1 and "is locked by another run" in err
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["status", LOCK]
        assert json.loads(summary.read_text())["exit_status"] == ExitStatus.LOCKED
    finally:
        holder.release()
    assert not Path(out / LOCK).exists()
