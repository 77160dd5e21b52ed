"""Atomic output directories: everything is written under a staging name and renamed into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

from .adapters import CONFIG, WEIGHTS
from .errors import SafeMergeError
from .tensors import save_tensors

SUMMARY = "summary.json"
DECISIONS = "decisions.parquet"


def check_output_target(out: str | os.PathLike) -> Path:
    """Refuse before any work if OUT holds something that is not an earlier safemerge-ray output."""
    if str(out).startswith("s3://"):
        raise SafeMergeError(f"output: s3:// locations are not supported yet ({out})")
    path = Path(out)
    if path.exists():
        if not path.is_dir():
            raise SafeMergeError(f"output: {path} exists and is not a directory")
        if any(path.iterdir()) and not (path / SUMMARY).is_file():
            raise SafeMergeError(
                f"output: {path} is a non-empty directory that is not a safemerge-ray output; "
                "refusing to replace it"
            )
    if not path.parent.exists():
        raise SafeMergeError(f"output: parent directory {path.parent} does not exist")
    return path


@contextlib.contextmanager
def staged_dir(out: Path):
    """Yield a fresh staging directory beside `out`; on success it replaces `out` in one rename."""
    stage = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        stage.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def write_adapter_files(directory: Path, tensors: dict, config: dict) -> None:
    save_tensors(tensors, directory / WEIGHTS, metadata={"format": "pt"})
    # safetensors creates its files 0600; consumers (a serving fleet) usually run as another user.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory / WEIGHTS, 0o666 & ~umask)
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
