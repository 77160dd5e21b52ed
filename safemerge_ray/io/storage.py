"""Where a location lives: a local path, an s3:// prefix or a Hugging Face hub id, opened as a `Dir`."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import SafeMergeError, first_line
from .dirs import Dir
from .local import LocalDir
from .s3 import S3Dir, S3Settings

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


HUB = "hf://"  # a location resolved as a Hugging Face hub id carries this scheme from then on


def resolve_location(location: str, base: str | os.PathLike | None = None) -> str:
    """An s3:// URI as written, a local path made absolute (relative to `base`, default the working
    directory), or a Hugging Face hub id as `hf://org/name`.

    Paths are made absolute before they travel to other processes, whose working directory differs.
    Something that looks like a local path never becomes a hub lookup: only `org/name` that starts
    with neither `.`, `/` nor `~`, does not exist locally, and whose `org` is not a local directory.
    """
    if location.startswith(("s3://", HUB)):
        return location
    absolute = local_path(location, base)
    if is_hub_id(location) and not Path(absolute).exists() and not Path(absolute).parent.is_dir():
        return HUB + location  # decided once: no later resolution (another node, another cwd) redoes it
    return absolute


def local_path(location: str, base: str | os.PathLike | None = None) -> str:
    """A local path made absolute: `~` expanded, relative to `base` (default: the working directory)."""
    base_path = Path(base) if base is not None else Path.cwd()
    return os.path.abspath(base_path / os.path.expanduser(location))


def local_or_s3(location: str, base: str | os.PathLike | None = None) -> str:
    """For what is listed, read as a file or written (prefixes, outputs, data files): never a hub id."""
    return location if location.startswith("s3://") else local_path(location, base)


def is_hub_id(location: str) -> bool:
    return bool(_HF_ID.match(location)) and not location.startswith((".", "/", "~"))


def open_dir(location: str, *, what: str, s3: S3Settings = S3Settings(), must_exist: bool = True) -> Dir:
    """Open a local directory, an s3:// prefix, or a Hugging Face hub id (for users with hub access).

    `what` names the input in error messages ("aligned model", "safety adapter", ...). A relative
    local path is taken relative to the working directory (configs resolve theirs before this).
    """
    if location.startswith("s3://"):
        d = S3Dir(location, s3)
        if must_exist and not d.list() and not d.subdirs():
            raise SafeMergeError(f"{what}: nothing under {d.uri}")
        return d
    resolved = resolve_location(location)
    if resolved.startswith(HUB):
        if not must_exist:
            raise SafeMergeError(f"{what}: {location} is a Hugging Face hub id; give a local path or s3://")
        return LocalDir(_hub_snapshot(resolved[len(HUB):], what))
    path = Path(resolved)
    if path.is_dir() or not must_exist:
        return LocalDir(path)
    if path.exists():
        raise SafeMergeError(f"{what}: {location} is a file; expected a directory")
    raise SafeMergeError(f"{what}: no such directory: {resolved}")


def _hub_snapshot(repo_id: str, what: str) -> Path:
    # Only safetensors and JSON: pickled checkpoints are never fetched, let alone loaded.
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as exc:  # offline, unknown repo, gated repo: all user-facing
        cause = first_line(exc, 200)
        raise SafeMergeError(
            f"{what}: {repo_id} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}{': ' + cause if cause != type(exc).__name__ else ''}); download it and give its "
            "local path"
        ) from None


def read_file(location: str, what: str, s3: S3Settings = S3Settings()) -> bytes:
    """One whole file, s3:// or a local path (relative to the working directory; a file is never a hub id)."""
    if location.startswith("s3://"):
        parent, _, name = location.rstrip("/").rpartition("/")
        return S3Dir(parent, s3).read(name)
    path = local_or_s3(location)
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SafeMergeError(f"{what}: no such file: {path}") from None
    except IsADirectoryError:
        raise SafeMergeError(f"{what}: {path} is a directory; expected a file") from None
