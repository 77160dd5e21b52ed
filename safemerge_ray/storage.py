"""Directories of files, local or remote, behind one small interface.

Everything above this module reads through a `Dir`: whole small files (configs, headers) and byte
ranges of big ones (one tensor at a time), so no caller ever holds a whole model.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Protocol

from .errors import SafeMergeError


class Dir(Protocol):
    uri: str

    def exists(self, name: str) -> bool: ...

    def size(self, name: str) -> int: ...

    def read(self, name: str) -> bytes: ...

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` with the file's bytes from `offset` on; a short file is an error."""

    def list(self) -> list[str]:
        """File names directly in this directory."""

    def version_tag(self, name: str) -> str:
        """Something that changes when the file's content does (mtime+size locally, the ETag on S3)."""


class LocalDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.uri = str(self.path)

    def _file(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return self._file(name).is_file()

    def size(self, name: str) -> int:
        return self._stat(name).st_size

    def _stat(self, name: str) -> os.stat_result:
        try:
            return self._file(name).stat()
        except FileNotFoundError:
            raise SafeMergeError(f"missing file: {self._file(name)}") from None

    def read(self, name: str) -> bytes:
        try:
            return self._file(name).read_bytes()
        except FileNotFoundError:
            raise SafeMergeError(f"missing file: {self._file(name)}") from None

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        want = len(buffer)
        with open(self._file(name), "rb", buffering=0) as f:
            f.seek(offset)
            got = 0
            while got < want:
                n = f.readinto(buffer[got:])
                if not n:
                    raise SafeMergeError(
                        f"{self._file(name)}: file ends after {offset + got} bytes, "
                        f"expected at least {offset + want} (truncated?)"
                    )
                got += n

    def list(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.is_file())

    def version_tag(self, name: str) -> str:
        st = self._stat(name)
        return f"{st.st_size}:{st.st_mtime_ns}"


_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def open_dir(location: str, *, what: str) -> Dir:
    """Open a local directory, an s3:// prefix, or a Hugging Face hub id (for users with hub access).

    `what` names the input in error messages ("aligned model", "safety adapter", ...).
    """
    if location.startswith("s3://"):
        raise SafeMergeError(f"{what}: s3:// locations are not supported yet ({location})")
    path = Path(location)
    if path.is_dir():
        return LocalDir(path)
    if path.exists():
        raise SafeMergeError(f"{what}: {location} is a file; expected a directory")
    if _HF_ID.match(location) and not location.startswith((".", "/")):
        return LocalDir(_hub_snapshot(location, what))
    raise SafeMergeError(f"{what}: no such directory: {location}")


def _hub_snapshot(repo_id: str, what: str) -> Path:
    # Only safetensors and JSON: pickled checkpoints are never fetched, let alone loaded.
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as exc:  # offline, unknown repo, gated repo: all user-facing
        raise SafeMergeError(
            f"{what}: {repo_id} is not a local directory and could not be fetched from the "
            f"Hugging Face hub ({type(exc).__name__}: {exc})"
        ) from None


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
