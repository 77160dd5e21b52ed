"""Directories of objects, local or on S3, behind one small interface.

Everything above this module reads through a `Dir`: whole small files (configs, headers) and byte
ranges of big ones (one tensor at a time), so no caller ever holds a whole model. Writes are
per-object atomic (a temporary name and a rename locally; S3 PUTs are atomic by nature).
"""

from __future__ import annotations

import builtins
import hashlib
import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import EnvironmentFailure, NoCredentials, SafeMergeError

# Objects of a run that is not committed yet carry this S3 tag; a bucket lifecycle rule
# (infra/terraform) expires tagged objects after some days, so a crashed run's leftovers go away,
# while the commit removes the tag before the run's manifest is written.
STAGED_TAG = "safemerge-state=staged"
TMP_PREFIX = ".tmp-"  # a local write in progress (or one a crash cut short: `gc` removes it)


class ReadCounter:
    """Bytes this process has read through any `Dir`: what reports and benchmarks call 'bytes read'."""

    def __init__(self):
        self._lock = threading.Lock()  # prefetch threads read beside the main thread
        self.total = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.total += n


BYTES_READ = ReadCounter()


class Dir(Protocol):
    uri: str

    def exists(self, name: str) -> bool: ...

    def size(self, name: str) -> int: ...

    def read(self, name: str) -> bytes: ...

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` with the object's bytes from `offset` on; a short object is an error."""

    def list(self) -> builtins.list[str]:
        """Object names directly in this directory."""

    def subdirs(self) -> builtins.list[str]:
        """Names of the directories directly in this directory."""

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
            data = self._file(name).read_bytes()
        except FileNotFoundError:
            raise SafeMergeError(f"missing file: {self._file(name)}") from None
        BYTES_READ.add(len(data))
        return data

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
        BYTES_READ.add(want)

    def list(self) -> builtins.list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.is_file())

    def subdirs(self) -> builtins.list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.is_dir() and not p.name.startswith("."))

    def child(self, name: str) -> LocalDir:
        return LocalDir(self.path / name)

    def write(self, name: str, data: bytes, staged: bool = False) -> None:
        target = self._file(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}"  # short, whatever the target's name
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def unstage(self, name: str) -> None:
        pass  # locally a run's files are only ever reached through its manifest and pointers

    def version_tag(self, name: str) -> str:
        st = self._stat(name)
        return f"{st.st_size}:{st.st_mtime_ns}"

    def walk(self, under: str = "") -> builtins.list[str]:
        root = self.path / under
        if not root.is_dir():
            return []
        return sorted(p.relative_to(self.path).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())

    def delete(self, names: builtins.list[str]) -> None:
        parents = set()
        for name in names:
            self._file(name).unlink(missing_ok=True)
            parents.add(self._file(name).parent)
        for parent in sorted(parents, key=lambda p: -len(p.parts)):  # empty directories go too
            while parent != self.path and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent


@dataclass(frozen=True)
class S3Settings:
    """Where S3 is; credentials are deliberately absent: boto3's standard chain supplies them."""

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 8  # botocore's standard retry mode: exponential backoff with jitter


def _s3_client(settings: S3Settings):
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": settings.max_attempts},
                    connect_timeout=10, read_timeout=60)
    return boto3.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config)


class S3Dir:
    """An s3://bucket/prefix/ 'directory'. One LIST gives sizes and ETags; tensors come by ranged GET."""

    def __init__(self, uri: str, settings: S3Settings = S3Settings(), client=None):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise SafeMergeError(f"not an s3:// location: {uri!r}")
        self.bucket, self.prefix = bucket, (prefix.rstrip("/") + "/" if prefix.strip("/") else "")
        self.settings = settings
        self.uri = f"s3://{bucket}/{self.prefix}"
        self._client = client
        self._entries: dict[str, tuple[int, str]] | None = None
        self._dirs: builtins.list[str] | None = None
        self._children: dict[str, S3Dir] = {}  # nested names reuse one listing per sub-prefix

    @property
    def client(self):
        if self._client is None:
            self._client = _s3_client(self.settings)
        return self._client

    def __getstate__(self):  # travels to Ray workers as its location; clients are rebuilt there
        return {"uri": self.uri, "settings": self.settings}

    def __setstate__(self, state):
        S3Dir.__init__(self, state["uri"], state["settings"])

    def _call(self, what: str, fn, **kwargs):
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise SafeMergeError(f"missing object: {what}") from None
            if code == "NoSuchBucket":
                raise SafeMergeError(f"no such bucket: s3://{self.bucket} ({what})") from None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
                raise EnvironmentFailure(f"S3 refused access to {what}: {code}") from None
            raise EnvironmentFailure(f"S3 error on {what}: {code or exc}") from None
        except (NoCredentialsError, PartialCredentialsError):
            raise NoCredentials(f"{what}: no AWS credentials (boto3 looked in the environment, profiles and the "
                                "instance or pod role); see README: credentials") from None
        except EndpointConnectionError as exc:
            endpoint = exc.kwargs.get("endpoint_url")
            raise EnvironmentFailure(f"S3 error on {what}: cannot connect to {endpoint}") from None
        except BotoCoreError as exc:  # timeouts, connection resets after retries, ...
            raise EnvironmentFailure(f"S3 error on {what}: {exc}") from None

    def _scan(self) -> tuple[dict[str, tuple[int, str]], builtins.list[str]]:
        entries, dirs = {}, []
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(self.uri, lambda **kw: list(paginator.paginate(**kw)), Prefix=self.prefix, Delimiter="/")
        for page in pages:
            for obj in page.get("Contents", []):
                entries[obj["Key"][len(self.prefix):]] = (obj["Size"], obj["ETag"].strip('"'))
            for cp in page.get("CommonPrefixes", []):
                dirs.append(cp["Prefix"][len(self.prefix):].rstrip("/"))
        self._entries, self._dirs = entries, sorted(dirs)
        return self._entries, self._dirs

    def _entry(self, name: str) -> tuple[int, str] | None:
        if "/" in name:
            parent, _, leaf = name.rpartition("/")
            if parent not in self._children:
                self._children[parent] = self.child(parent)
            return self._children[parent]._entry(leaf)
        entries = self._entries if self._entries is not None else self._scan()[0]
        return entries.get(name)

    def exists(self, name: str) -> bool:
        return self._entry(name) is not None

    def size(self, name: str) -> int:
        entry = self._entry(name)
        if entry is None:
            raise SafeMergeError(f"missing object: {self.uri}{name}")
        return entry[0]

    def version_tag(self, name: str) -> str:
        entry = self._entry(name)
        if entry is None:
            raise SafeMergeError(f"missing object: {self.uri}{name}")
        return entry[1]

    def read(self, name: str) -> bytes:
        resp = self._call(f"{self.uri}{name}", self.client.get_object, Key=self.prefix + name)
        data = resp["Body"].read()
        BYTES_READ.add(len(data))
        return data

    def read_into(self, name: str, offset: int, buffer: memoryview) -> None:
        want = len(buffer)
        if want == 0:
            return
        where = f"{self.uri}{name}"
        size = self.size(name)
        if offset + want > size:
            raise SafeMergeError(f"{where}: object ends after {size} bytes, expected at least {offset + want} "
                                 "(truncated?)")
        resp = self._call(where, self.client.get_object, Key=self.prefix + name,
                          Range=f"bytes={offset}-{offset + want - 1}")
        got = 0
        for chunk in resp["Body"].iter_chunks(chunk_size=8 << 20):
            buffer[got:got + len(chunk)] = chunk
            got += len(chunk)
        BYTES_READ.add(got)
        if got != want:
            raise SafeMergeError(f"{where}: ranged read returned {got} bytes, expected {want}")

    def list(self) -> builtins.list[str]:
        entries = self._entries if self._entries is not None else self._scan()[0]
        return sorted(entries)

    def subdirs(self) -> builtins.list[str]:
        dirs = self._dirs if self._dirs is not None else self._scan()[1]
        return list(dirs)

    def child(self, name: str) -> S3Dir:
        return S3Dir(f"{self.uri}{name.strip('/')}/", self.settings, self._client)

    def write(self, name: str, data: bytes, staged: bool = False) -> None:
        extra = {"Tagging": STAGED_TAG} if staged else {}
        self._call(f"{self.uri}{name}", self.client.put_object, Key=self.prefix + name, Body=data, **extra)
        self._entries = self._dirs = None  # the listings are stale now
        self._children.clear()

    def unstage(self, name: str) -> None:
        self._call(f"{self.uri}{name}", self.client.delete_object_tagging, Key=self.prefix + name)

    def walk(self, under: str = "") -> builtins.list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(f"{self.uri}{under}", lambda **kw: list(paginator.paginate(**kw)),
                           Prefix=self.prefix + under)
        return sorted(obj["Key"][len(self.prefix):] for page in pages for obj in page.get("Contents", []))

    def delete(self, names: builtins.list[str]) -> None:
        for i in range(0, len(names), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self.prefix + n} for n in names[i:i + 1000]]
            resp = self._call(self.uri, self.client.delete_objects, Delete={"Objects": batch, "Quiet": True})
            if resp.get("Errors"):
                err = resp["Errors"][0]
                raise EnvironmentFailure(f"S3 refused to delete {self.uri}{err['Key'][len(self.prefix):]}: "
                                         f"{err.get('Code')} ({len(resp['Errors'])} object(s) not deleted)")
        self._entries = self._dirs = None
        self._children.clear()


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
        cause = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise SafeMergeError(
            f"{what}: {repo_id} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}{': ' + cause if cause else ''}); download it and give its local path"
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


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
