"""Output bytes and their commit: a local directory appears whole (one rename), an S3 prefix gets its
summary last (a prefix without `summary.json` is not a finished output)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import save as safetensors_bytes

from . import __version__
from .adapters import CONFIG, WEIGHTS
from .errors import SafeMergeError
from .storage import Dir, LocalDir, S3Dir, S3Settings

SUMMARY = "summary.json"
DECISIONS = "decisions.parquet"


def adapter_files(tensors: dict, config: dict) -> dict[str, bytes]:
    """A PEFT adapter directory as bytes: the same inputs always give the same bytes."""
    weights = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    return {CONFIG: json_bytes(config), WEIGHTS: weights}


def json_bytes(data) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _is_our_output(d: Dir) -> bool:
    if not d.exists(SUMMARY):
        return False
    try:
        return json.loads(d.read(SUMMARY)).get("tool") == "safemerge-ray"
    except (ValueError, AttributeError):
        return False


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
    stage = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    old = None
    try:
        yield stage
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        stage.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if old is not None and not out.exists():
            old.rename(out)  # the swap failed half-way: put the previous output back
        raise


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
    tool_version: str = __version__

    @property
    def key(self) -> str:
        stamp = self.started_at.replace("-", "").replace(":", "")
        return f"{HISTORY}{stamp}-{self.run_id or 'no-run'}-{uuid.uuid4().hex[:6]}.json"

    def to_dict(self) -> dict:
        return {"tool": "safemerge-ray", **asdict(self)}

    def set_failed(self, reasons: dict[str, str]) -> None:
        names = sorted(reasons)
        self.failed = {n: reasons[n][:_MAX_REASON] for n in names[:_MAX_LISTED_FAILURES]}
        if len(names) > _MAX_LISTED_FAILURES:
            self.failed["..."] = f"and {len(names) - _MAX_LISTED_FAILURES} more; see the run's summary.json"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_run_record(out: Dir, record: RunRecord) -> None:
    """The history entry first, then `last_run.json`, which alerting reads."""
    data = json_bytes(record.to_dict())
    out.write(record.key, data)
    out.write(LAST_RUN, data)
