"""The one storage interface: a directory of objects, local (`local.py`) or on S3 (`s3.py`).

Everything above `io` reads through a `Dir`: whole small files (configs, headers) and byte ranges of big
ones (one tensor at a time), so no caller ever holds a whole model. Writes are per-object atomic (a
temporary name and a rename locally; S3 PUTs are atomic by nature). Two conditional writes
(`create_exclusive`, `replace_if_match`) let a caller hold a lock without knowing where the bytes live;
each backend's differences stay inside its class.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import threading
from pathlib import Path
from typing import Protocol

from ..errors import SafeMergeError

# Objects of a run that is not committed yet carry this S3 tag; a bucket lifecycle rule
# (infra/terraform) expires tagged objects after some days, so a crashed run's leftovers go away,
# while the commit removes the tag before the run's manifest is written.
STAGED_TAG = "safemerge-state=staged"
TMP_PREFIX = ".tmp-"  # a local write in progress (or one a crash cut short: `gc` removes it)


class ReadCounter:
    """Bytes this process has read through any `Dir`: what reports and benchmarks call 'bytes read'."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # prefetch threads read beside the main thread
        self.total = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.total += n


BYTES_READ = ReadCounter()


class Dir(Protocol):
    uri: str
    # The directory on this machine's disk, None for a remote store: for what only a local disk has (symbolic
    # links, files an interrupted write leaves, a path a process can be handed, nodes that do not share it).
    local_path: Path | None

    def exists(self, name: str) -> bool: ...

    def size(self, name: str) -> int: ...

    def read(self, name: str) -> bytes: ...

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` with the object's bytes from `offset` on; a short object is an error."""

    def list(self) -> builtins.list[str]:
        """Object names directly in this directory."""

    def subdirs(self) -> builtins.list[str]:
        """Names of the directories directly in this directory."""

    def links(self) -> builtins.list[str]:
        """Names of symbolic links directly in this directory (local only): never followed by `subdirs`."""

    def child(self, name: str) -> Dir: ...

    def write(self, name: str, data: bytes, staged: bool = False) -> None:
        """Write one object atomically; `name` may contain '/'. A `staged` object belongs to a run
        that is not committed yet (on S3 it carries the tag STAGED_TAG until `unstage`)."""

    def unstage(self, name: str) -> None:
        """Mark a staged object as part of a committed run."""

    def version_tag(self, name: str) -> str:
        """Something that changes when the object's content does (size+mtime locally, the ETag on S3)."""

    def walk(self, under: str = "") -> builtins.list[str]:
        """Every object name below `under` (a sub-path ending in '/', or '' for all), at any depth."""

    def delete(self, names: builtins.list[str]) -> None:
        """Remove these objects (missing ones are fine)."""

    def write_all(self, files: dict[str, bytes], last: str) -> None:
        """Write `files` so that a reader sees all of them or (by `last`'s absence) none: a local directory is
        replaced as a whole, an S3 prefix gets `last` after the rest."""

    def create_exclusive(self, name: str, data: bytes) -> str | None:
        """Create the object only if it does not exist, whole (no reader ever sees it partly written): its
        version tag, or None when it already existed."""

    def read_tagged(self, name: str) -> tuple[bytes, str] | None:
        """The object's bytes and a tag for `replace_if_match`, or None when it does not exist."""

    def replace_if_match(self, name: str, data: bytes, tag: str) -> str | None:
        """Replace the object only if it is still the one `read_tagged` tagged `tag`: the new tag, or None
        when it changed or vanished meanwhile (of two callers with the same tag, one wins)."""

    def arrow_location(self, name: str) -> tuple[str, object | None]:
        """(path, pyarrow filesystem) of the sub-directory `name`, for libraries that write through pyarrow (Ray
        Train's checkpoints); None as the filesystem means the local one."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_bytes(data: object) -> bytes:
    """JSON as this tool writes it: sorted keys, indented, one trailing newline (the same data, the same bytes)."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def read_json(d: Dir, name: str) -> dict | None:
    """A JSON object this tool wrote (a pointer, a manifest, a summary), or None when it is missing or
    damaged: a damaged record only means that what it described is redone or reported."""
    try:
        value = json.loads(d.read(name)) if d.exists(name) else None
    except (SafeMergeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


