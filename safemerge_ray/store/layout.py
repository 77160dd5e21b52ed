"""Where everything lives in a fleet output, and the names that become paths.

    runs/<run_id>/<adapter>/   adapter_config.json, adapter_model.safetensors   (staged until the commit)
    runs/<run_id>/             decisions.parquet, summary.json, manifest.json   (the manifest last: the commit)
    latest/<adapter>.json      pointers: moved only after the manifest is written
                               (an adapter's versioned name, `<adapter>@<run_id>`, is its pointer's run)
    status/                    lock.json (the run lock), last_run.json and history/ (run records)
"""

from __future__ import annotations

import datetime as _dt
import re
import uuid

from ..errors import SafeMergeError
from ..io import Dir, json_bytes, read_json

SUMMARY = "summary.json"
MANIFEST = "manifest.json"  # a run's commit point: written last; a run without it did not happen
DECISIONS = "decisions.parquet"
REPORT = "report.html"  # `safemerge-ray report` writes it beside a run (or at the output's top): not garbage


LAST_RUN = "status/last_run.json"
HISTORY = "status/history/"
LOCK = "status/lock.json"
VERIFIED = "status/verified.json"  # when a run last re-hashed every published adapter (verify_published)
RUNS, LATEST = "runs/", "latest/"


def run_prefix(run_id: str) -> str:
    return f"{RUNS}{run_id}/"


def adapter_prefix(run_id: str, adapter: str) -> str:
    return f"{RUNS}{run_id}/{adapter}/"


def manifest_key(run_id: str) -> str:
    return f"{RUNS}{run_id}/{MANIFEST}"


def pointer_key(adapter: str) -> str:
    return f"{LATEST}{adapter}.json"


def published_names(out: Dir) -> list[str]:
    """Every adapter with a pointer (`latest/<adapter>.json`), sorted."""
    return sorted(n.removesuffix(".json") for n in out.child(LATEST).list() if n.endswith(".json"))


def read_pointer(out: Dir, adapter: str) -> dict | None:
    """An adapter's pointer, or None when it has none (or a damaged one: the adapter is redone)."""
    return read_json(out, pointer_key(adapter))


def versioned_name(adapter: str, run_id: str) -> str:
    """An adapter's stable name, `<adapter>@<run_id>`: one published version, whatever its pointer does later.
    Derived from a pointer's adapter and run, so outputs written before it existed have one too ('@' is never
    in an adapter name or a run id)."""
    return f"{adapter}@{run_id}"


def split_versioned_name(name: str) -> tuple[str, str] | None:
    """(adapter, run_id) of a versioned name, or None when `name` is not one."""
    adapter, at, run_id = name.partition("@")
    if not at or not RUN_ID.fullmatch(run_id) or not _NAME.fullmatch(adapter) or len(adapter) > MAX_NAME:
        return None
    return adapter, run_id


def pointer_bytes(adapter: str, run_id: str, run_key: str, committed_at: str, **extra) -> bytes:
    """`latest/<adapter>.json`: what consumers follow to an adapter's published run."""
    return json_bytes({"adapter": adapter, "run_id": run_id, "path": adapter_prefix(run_id, adapter),
                       "manifest": manifest_key(run_id), "run_key": run_key, "committed_at": committed_at,
                       **extra})



def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_run_id() -> str:
    """The run's UTC start time and a random suffix: `20261122T035715Z-3f2a9c`."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


RUN_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")


def check_run_id(run_id: str, where: str) -> str:
    """A run id as `new_run_id` makes them, and nothing else: a run id becomes a path (`runs/<id>/`), so
    `../..` or `/etc` must never reach one."""
    if not RUN_ID.fullmatch(run_id):
        raise SafeMergeError(f"{where}: {run_id[:80]!r} is not a run id (like 20261122T035715Z-3f2a9c; see runs/ "
                             "or `safemerge-ray runs`)")
    return run_id


def key_uri(out: Dir, key: str) -> str:
    """Where an object of `out` is, for a message: `OUT/runs/<id>/manifest.json` (one slash, local or S3)."""
    return f"{out.uri.rstrip('/')}/{key}"


def missing_run(out: Dir, run_id: str) -> str:
    """Why a run has no readable manifest: it does not exist, or it never committed."""
    return "it did not commit" if run_id in out.child(RUNS).subdirs() else "it does not exist"


def run_time(run_id: str) -> float | None:
    """A run id starts with its UTC start time (20261122T035715Z-...)."""
    try:
        stamp = _dt.datetime.strptime(run_id.split("-", 1)[0], "%Y%m%dT%H%M%SZ")
    except ValueError:
        return None
    return stamp.replace(tzinfo=_dt.UTC).timestamp()


_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")
MAX_NAME = 128  # names become file names (`latest/<name>.json` and its temp name): far below 255 bytes


def check_adapter_name(name: str) -> str:
    """Adapter names become output paths (`runs/<id>/<name>/`), so they must be one safe path component."""
    if not _NAME.fullmatch(name) or name in (".", "..") or len(name) > MAX_NAME:
        raise ValueError(f"adapter name {name[:MAX_NAME]!r} must be at most {MAX_NAME} letters, digits, '.', '_' "
                         "or '-', starting with a letter or digit")
    return name
