"""The output store: what is written where, and how it becomes visible.

`merge` output: a local directory appears whole (one rename); an S3 prefix gets its summary last (a
prefix without `summary.json` is not a finished output).

Fleet output (local or S3), one module for its whole life:

    runs/<run_id>/<adapter>/   adapter_config.json, adapter_model.safetensors   (staged until the commit)
    runs/<run_id>/             decisions.parquet, summary.json, manifest.json   (the manifest last: the commit)
    latest/<adapter>.json      pointers: moved only after the manifest is written
    status/                    lock.json (the run lock), last_run.json and history/ (run records)

Its parts, in order: layout, the commit (`commit_run`), run records, the run lock, verification
(`write_verified`, `published_damage`, `verify_output`), `rollback`, and clean-up (`collect_garbage`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import socket
import struct
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_torch_bytes

from . import __version__
from .adapters import CONFIG, WEIGHTS
from .errors import EnvironmentFailure, SafeMergeError, first_line
from .storage import Dir, LocalDir, S3Dir, S3Settings, sha256_of

SUMMARY = "summary.json"
MANIFEST = "manifest.json"  # a run's commit point: written last; a run without it did not happen
DECISIONS = "decisions.parquet"
REPORT = "report.html"  # `safemerge-ray report` writes it beside a run (or at the output's top): not garbage


def adapter_files(tensors: dict, config: dict) -> dict[str, bytes]:
    """A PEFT adapter directory as bytes: the same inputs always give the same bytes."""
    return {CONFIG: json_bytes(config), WEIGHTS: safetensors_bytes(tensors, {"format": "pt"})}


_PLAIN = re.compile(r"[A-Za-z0-9_.\-]+")  # names and metadata JSON writes as they are, unescaped


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The bytes safetensors writes for these tensors. A merged adapter is float32 tensors with plain names:
    those are laid out here, in one copy (safetensors' API spends ~25 us per tensor on checks and
    conversions: much of an assembly of a thousand small layers); anything else goes through safetensors.
    tests/test_tensors.py checks both give the same bytes."""
    plain = all(_PLAIN.fullmatch(x) for x in (*metadata, *metadata.values()))
    if not (plain and all(t.dtype == torch.float32 and t.device.type == "cpu" and _PLAIN.fullmatch(k)
                          for k, t in tensors.items())):
        return safetensors_torch_bytes({k: t.contiguous() for k, t in tensors.items()}, metadata=metadata)
    names = sorted(tensors)  # safetensors: by dtype (one here), then by name
    entries, offset = [], 0
    for name in names:
        size = 4 * tensors[name].numel()
        shape = ",".join(str(d) for d in tensors[name].shape)
        entries.append(f'"{name}":{{"dtype":"F32","shape":[{shape}],"data_offsets":[{offset},{offset + size}]}}')
        offset += size
    meta = ",".join(f'"{k}":"{v}"' for k, v in metadata.items())
    header = ("{" + ",".join(([f'"__metadata__":{{{meta}}}'] if metadata else []) + entries) + "}").encode()
    header += b" " * (-len(header) % 8)
    return b"".join([struct.pack("<Q", len(header)), header, *(tensors[n].contiguous().numpy().data for n in names)])


def float32_finite(weights: bytes) -> bool:
    """Whether a safetensors file of float32 tensors holds only finite values: one sum over its data (NaN and
    Inf poison it; a sum that overflows says False, and the caller looks tensor by tensor)."""
    (header_len,) = struct.unpack("<Q", weights[:8])
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.frombuffer(weights, dtype=np.float32, offset=8 + header_len).sum()))


def json_bytes(data) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def read_json(d: Dir, name: str) -> dict | None:
    """A JSON object this tool wrote (a pointer, a manifest, a summary), or None when it is missing or
    damaged: a damaged record only means that what it described is redone or reported."""
    try:
        value = json.loads(d.read(name)) if d.exists(name) else None
    except (SafeMergeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------- layout
RUNS, LATEST = "runs/", "latest/"


def run_prefix(run_id: str) -> str:
    return f"{RUNS}{run_id}/"


def adapter_prefix(run_id: str, adapter: str) -> str:
    return f"{RUNS}{run_id}/{adapter}/"


def manifest_key(run_id: str) -> str:
    return f"{RUNS}{run_id}/{MANIFEST}"


def pointer_key(adapter: str) -> str:
    return f"{LATEST}{adapter}.json"


def read_pointer(out: Dir, adapter: str) -> dict | None:
    """An adapter's pointer, or None when it has none (or a damaged one: the adapter is redone)."""
    return read_json(out, pointer_key(adapter))


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
    if isinstance(out, S3Dir):
        for name, data in files.items():
            if name != last:
                out.write(name, data)
        out.write(last, files[last])
        return
    with staged_dir(Path(out.uri)) as stage:
        for name, data in files.items():
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            (stage / name).write_bytes(data)


@contextlib.contextmanager
def staged_dir(out: Path):
    """Yield a fresh staging directory beside `out`; on success it replaces `out` in one rename."""
    stage = out.parent / f".{out.name[:64]}.partial-{uuid.uuid4().hex[:8]}"  # short, whatever the name
    stage.mkdir()
    old = None
    try:
        yield stage
        if out.exists():
            old = out.parent / f".{out.name[:64]}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        stage.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if old is not None and not out.exists():
            old.rename(out)  # the swap failed half-way: put the previous output back
        raise


# --------------------------------------------------------------------------- the fleet's commit


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
               failed: dict[str, str], held: dict[str, str] | None = None) -> str:
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
        "failed": failed,
        "held": held or {},  # written but held back by the gate: not published, pointers unmoved
    }
    with ThreadPoolExecutor(max_workers=16) as pool:  # S3 round trips, one per object
        list(pool.map(out.unstage, [key for a in adapters for key in a.objects] + list(run_objects)))
    out.write(manifest_key(run_id), json_bytes(manifest))
    for a in adapters:
        out.write(pointer_key(a.name), pointer_bytes(a.name, run_id, a.run_key, now))
    return now


# --------------------------------------------------------------------------- run records
# Every fleet run, including one with nothing to do or one that stopped on an error, leaves a small
# record: `status/last_run.json` (what alerting reads) and one file per run under `status/history/`.
LAST_RUN = "status/last_run.json"
HISTORY = "status/history/"
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
    tool_version: str = __version__
    kind: str = "fleet"  # or "rollback" (an operator moved a pointer), "gc" (old runs removed)

    @property
    def key(self) -> str:
        stamp = self.started_at.replace("-", "").replace(":", "")
        return f"{HISTORY}{stamp}-{self.run_id or 'no-run'}-{uuid.uuid4().hex[:6]}.json"

    def to_dict(self) -> dict:
        return {"tool": "safemerge-ray", **asdict(self)}

    def set_failed(self, reasons: dict[str, str]) -> None:
        self.failed = _bounded(reasons)

    def set_held(self, reasons: dict[str, str]) -> None:
        self.held = _bounded(reasons)


def _bounded(reasons: dict[str, str]) -> dict[str, str]:
    """The first 100 adapters' reasons, each cut short: a record stays small however many there are."""
    names = sorted(reasons)
    listed = {n: reasons[n][:_MAX_REASON] for n in names[:_MAX_LISTED_FAILURES]}
    if len(names) > _MAX_LISTED_FAILURES:
        listed["..."] = f"and {len(names) - _MAX_LISTED_FAILURES} more; see the run's summary.json"
    return listed


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_run_record(out: Dir, record: RunRecord) -> None:
    """The history entry first, then (for a fleet run) `last_run.json`, which alerting reads."""
    data = json_bytes(record.to_dict())
    out.write(record.key, data)
    if record.kind == "fleet":  # a rollback must not look like a night that ran
        out.write(LAST_RUN, data)


def pointer_bytes(adapter: str, run_id: str, run_key: str, committed_at: str, **extra) -> bytes:
    """`latest/<adapter>.json`: what consumers follow to an adapter's published run."""
    return json_bytes({"adapter": adapter, "run_id": run_id, "path": adapter_prefix(run_id, adapter),
                       "manifest": manifest_key(run_id), "run_key": run_key, "committed_at": committed_at,
                       **extra})


def rollback(out: Dir, adapter: str, run_id: str, break_lock: bool = False) -> RunRecord:
    """Point `adapter` back at its output from an earlier committed run, after re-verifying every byte
    of it, under the run lock; the history records it (last_run.json stays the last fleet run's)."""
    record = RunRecord(started_at=utc_now(), output=out.uri, config="", kind="rollback")
    lock = RunLock(out).acquire(break_lock=break_lock)
    try:
        manifest = read_json(out, manifest_key(run_id))
        if manifest is None:
            raise SafeMergeError(f"rollback: {out.uri}{manifest_key(run_id)}: no readable manifest "
                                 f"(run {run_id} did not commit)")
        entry = manifest.get("adapters", {}).get(adapter)
        if not entry:
            raise SafeMergeError(f"rollback: run {run_id} did not commit {adapter}")
        problems = verify_objects(out, entry.get("objects", {}))
        if problems:
            raise EnvironmentFailure(f"rollback: {adapter} in run {run_id} is damaged: {problems[0]}")
        out.write(pointer_key(adapter), pointer_bytes(adapter, run_id, entry["run_key"], manifest["committed_at"],
                                                      rolled_back_at=utc_now()))
        record.run_id = run_id
        record.warnings = [f"rollback: {adapter} now points at run {run_id}"]
        record.ended_at = utc_now()
        write_run_record(out, record)
        return record
    finally:
        lock.release()


# --------------------------------------------------------------------------- the run lock
# One run per output at a time. The lock is an object created only if absent (S3 `If-None-Match: *`;
# locally O_CREAT|O_EXCL). It names its owner and carries a lease that the running job renews; a lock
# whose lease has expired (its run died without releasing it) is taken over, on S3 by a conditional
# overwrite (`If-Match` on the stale lock's ETag), so of two runs taking it over at once only one wins.
LOCK = "status/lock.json"
LEASE_S = 300.0
EXIT_LOCKED = 5


class LockHeld(EnvironmentFailure):
    """Another run holds the output's lock (exit status 5: nothing was done, try later)."""

    exit_code = EXIT_LOCKED


@dataclass
class RunLock:
    out: Dir
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    lease_s: float = LEASE_S
    _tag: str | None = None  # the ETag (S3) of our lock object, for conditional renewals
    _stop: threading.Event = field(default_factory=threading.Event)
    _renewer: threading.Thread | None = None
    lost: str | None = None  # why a renewal failed: the run must not commit

    def _body(self) -> bytes:
        return json_bytes({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "acquired_at": utc_now(), "lease_until": time.time() + self.lease_s,
                           "tool_version": __version__})

    def acquire(self, break_lock: bool = False) -> RunLock:
        if self._create():
            return self._start_renewing()
        held, tag = self._read()
        if held is not None and held.get("owner") == self.owner:
            # Our create reached the store but its answer was lost, and botocore's retry found our own lock.
            self._tag = tag
            return self._start_renewing()
        expired = held is None or float(held.get("lease_until", 0)) < time.time()
        if (break_lock or expired) and self._take_over(tag):
            return self._start_renewing()
        who = held or {}
        raise LockHeld(f"output {self.out.uri} is locked by another run (host {who.get('host', '?')}, pid "
                       f"{who.get('pid', '?')}, since {who.get('acquired_at', '?')}, lease until "
                       f"{_dt.datetime.fromtimestamp(float(who.get('lease_until', 0)), _dt.timezone.utc):%H:%M:%SZ}); "
                       "nothing was done. If that run is dead, its lease expires by itself; or rerun with --break-lock")

    def release(self) -> None:
        """Never raises: a lock that cannot be removed (the store is down) expires with its lease."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=30)
        try:
            held, _ = self._read()
            if held is not None and held.get("owner") == self.owner:
                self._delete()
        except Exception as exc:  # noqa: BLE001  # botocore's errors included
            print(f"warning: could not release the run lock {self.out.uri}{LOCK} ({first_line(exc)}); it expires "
                  f"by itself within {self.lease_s:.0f} s", file=sys.stderr, flush=True)

    # -- storage-specific parts
    def _create(self) -> bool:
        if isinstance(self.out, S3Dir):
            return self._s3_put(IfNoneMatch="*")
        path = Path(self.out.uri) / LOCK
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._body())
        return True

    def _take_over(self, tag: str | None) -> bool:
        if isinstance(self.out, S3Dir):
            return self._s3_put(IfMatch=tag) if tag else self._s3_put(IfNoneMatch="*")
        path = Path(self.out.uri) / LOCK
        try:  # one renamer wins; the others find the stale lock gone
            path.rename(path.with_name(f".lock-stale-{uuid.uuid4().hex[:8]}"))
        except FileNotFoundError:
            return False
        for stale in path.parent.glob(".lock-stale-*"):
            stale.unlink(missing_ok=True)
        return self._create()

    def _renew(self) -> None:
        held, _ = self._read()
        if held is None or held.get("owner") != self.owner:
            raise LockHeld(f"the run lock on {self.out.uri} was taken over by another run")
        if not isinstance(self.out, S3Dir):
            self.out.write(LOCK, self._body())
        elif not self._s3_put(IfMatch=self._tag):
            held, tag = self._read()  # a lost answer to our own renewal changed the ETag under us
            if held is None or held.get("owner") != self.owner:
                raise LockHeld(f"the run lock on {self.out.uri} was taken over by another run")
            self._tag = tag

    def _read(self) -> tuple[dict | None, str | None]:
        try:
            if isinstance(self.out, S3Dir):
                resp = self.out.client.get_object(Bucket=self.out.bucket, Key=self.out.prefix + LOCK)
                return json.loads(resp["Body"].read()), resp["ETag"]
            return json.loads((Path(self.out.uri) / LOCK).read_bytes()), None
        except (FileNotFoundError, ValueError):
            return None, None
        except Exception as exc:  # botocore: NoSuchKey is absent; anything else is the environment
            if (getattr(exc, "response", None) or {}).get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise EnvironmentFailure(f"cannot read the run lock {self.out.uri}{LOCK}: {exc}") from None

    def _delete(self) -> None:
        if isinstance(self.out, S3Dir):
            self.out.client.delete_object(Bucket=self.out.bucket, Key=self.out.prefix + LOCK)
        else:
            (Path(self.out.uri) / LOCK).unlink(missing_ok=True)

    def _s3_put(self, **condition) -> bool:
        assert isinstance(self.out, S3Dir)
        try:
            resp = self.out.client.put_object(Bucket=self.out.bucket, Key=self.out.prefix + LOCK, Body=self._body(),
                                              **condition)
        except Exception as exc:
            code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise EnvironmentFailure(f"cannot write the run lock {self.out.uri}{LOCK}: {exc}") from None
        self._tag = resp.get("ETag")
        return True

    def _start_renewing(self) -> RunLock:
        def renew() -> None:
            while not self._stop.wait(self.lease_s / 3):
                try:
                    self._renew()
                except SafeMergeError as exc:
                    self.lost = str(exc)
                    return

        self._renewer = threading.Thread(target=renew, name="safemerge-lock-lease", daemon=True)
        self._renewer.start()
        return self


# --------------------------------------------------------------------------- verification
# Every published object is recorded in its run's manifest with its sha256, size and version tag (the
# S3 ETag, or size and mtime locally). Writing reads each object back and checks its sha256 before the
# pointer may move; each night compares version tags (a listing, no download) to find damaged or
# deleted adapters and redoes them; `safemerge-ray verify` re-reads and re-hashes on demand.


def write_verified(out: Dir, key: str, data: bytes, staged: bool = False) -> dict:
    """Write one object, read it back, and return its manifest entry; a mismatch is an EnvironmentFailure."""
    out.write(key, data, staged=staged)
    try:
        back = out.read(key)
    except SafeMergeError as exc:
        raise EnvironmentFailure(f"{out.uri}{key} did not read back after writing: {exc}") from None
    if back != data:
        raise EnvironmentFailure(f"{out.uri}{key} read back different bytes than were written")
    return {"sha256": sha256_of(data), "bytes": len(data), "version": out.version_tag(key)}


def cached_manifest(out: Dir, key: str, manifests: dict[str, dict | None]) -> dict | None:
    """A run's manifest by key, read once per run however many adapters point at it."""
    if key not in manifests:
        manifests[key] = read_json(out, key) if key else None
    return manifests[key]


def published_damage(out: Dir, adapter: str, pointer: dict, manifests: dict[str, dict | None]) -> str | None:
    """None if the adapter its pointer names is published intact (its manifest's objects, by version tag);
    `manifests` caches the runs' manifests across adapters."""
    key = str(pointer.get("manifest", ""))
    entry = (cached_manifest(out, key, manifests) or {}).get("adapters", {}).get(adapter)
    if not entry:
        return f"its published run's manifest ({key or 'none'}) is missing or does not list it"
    return published_intact(out, entry.get("objects", {}))


def published_intact(out: Dir, objects: dict[str, dict]) -> str | None:
    """None if every object is there with the version the manifest recorded; else what is wrong.
    Cheap (listings and stats only): what a nightly run checks before calling an adapter unchanged."""
    for key, meta in objects.items():
        if not out.exists(key):
            return f"{key} is missing"
        if "version" in meta and out.version_tag(key) != meta["version"]:
            return f"{key} changed since it was published"
    return None


def verify_objects(out: Dir, objects: dict[str, dict]) -> list[str]:
    """Re-read every object and check its sha256 and size against the manifest: the problems found."""
    problems = []
    for key, meta in sorted(objects.items()):
        try:
            data = out.read(key)
        except SafeMergeError:
            problems.append(f"{key}: missing")
            continue
        if len(data) != meta["bytes"] or sha256_of(data) != meta["sha256"]:
            problems.append(f"{key}: sha256 or size differs from the manifest")
    return problems


def verify_output(out: Dir, adapter: str | None = None, run: str | None = None) -> list[tuple[str, list[str]]]:
    """(what, problems) for every published adapter (or one, or every object of one run)."""
    def manifest_at(key: str) -> dict:
        manifest = read_json(out, key)
        if manifest is None:
            raise SafeMergeError(f"verify: no readable manifest at {out.uri}{key}")
        return manifest

    if run is not None:
        manifest = manifest_at(manifest_key(run))
        objects = dict(manifest.get("objects", {}))
        for entry in manifest.get("adapters", {}).values():
            objects.update(entry.get("objects", {}))
        return [(f"run {run}", verify_objects(out, objects))]
    pointers = out.child(LATEST).list()
    names = [adapter] if adapter else sorted(n.removesuffix(".json") for n in pointers if n.endswith(".json"))
    if not names:
        raise SafeMergeError(f"verify: {out.uri} has no published adapters (no latest/*.json)")
    results = []
    for name in names:
        pointer = read_pointer(out, name)
        if pointer is None:
            results.append((name, [f"{pointer_key(name)}: missing or not JSON"]))
            continue
        entry = manifest_at(pointer["manifest"]).get("adapters", {}).get(name)
        if not entry:
            results.append((name, [f"{pointer['manifest']} does not list {name}"]))
            continue
        results.append((name, verify_objects(out, entry.get("objects", {}))))
    return results


# --------------------------------------------------------------------------- clean-up
# What no pointer needs goes, under the run lock (so no run is writing): committed runs beyond the
# newest K that no pointer names, runs that never committed (a crash, a deadline), objects inside
# kept runs that their manifest does not list (a failed attempt's writes), and interrupted local
# writes. With `older_than_s`, only what is older than that.


@dataclass
class GarbageReport:
    removed_runs: list[str] = field(default_factory=list)  # "RUN (committed|uncommitted)"
    leftovers: list[str] = field(default_factory=list)  # objects outside any manifest in kept runs, temp files
    kept_runs: list[str] = field(default_factory=list)
    objects: int = 0  # objects removed in all


def _run_time(run_id: str) -> float | None:
    """A run id starts with its UTC start time (20261122T035715Z-...)."""
    try:
        stamp = _dt.datetime.strptime(run_id.split("-", 1)[0], "%Y%m%dT%H%M%SZ")
    except ValueError:
        return None
    return stamp.replace(tzinfo=_dt.timezone.utc).timestamp()


def collect_garbage(out: Dir, keep: int, older_than_s: float | None = None, dry_run: bool = False,
                    break_lock: bool = False) -> GarbageReport:
    if keep < 0:
        raise SafeMergeError("gc: --keep must be 0 or more")
    report = GarbageReport()
    lock = None if dry_run else RunLock(out).acquire(break_lock=break_lock)
    try:
        now = time.time()

        def old_enough(run_id: str) -> bool:
            started = _run_time(run_id)
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
        if isinstance(out, LocalDir):  # interrupted writes and the lock's own debris, anywhere
            report.leftovers += [k for k in out.walk() if k.rsplit("/", 1)[-1].startswith(
                (".tmp-", ".lock-stale-", ".preflight-")) and not k.startswith(RUNS)]
        doomed += report.leftovers
        report.objects = len(doomed)
        if not dry_run and doomed:
            out.delete(doomed)
            record = RunRecord(started_at=utc_now(), output=out.uri, config="", kind="gc")
            record.warnings = [f"gc: removed run {r}" for r in report.removed_runs][:100] + (
                [f"gc: removed {len(report.leftovers)} leftover object(s) in kept runs"] if report.leftovers else [])
            record.ended_at = utc_now()
            write_run_record(out, record)
        return report
    finally:
        if lock is not None:
            lock.release()
