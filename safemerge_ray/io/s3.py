"""An S3 prefix as a `Dir`: one LIST gives sizes and ETags, tensors come by ranged GET, conditional writes by
`If-None-Match` / `If-Match`."""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EnvironmentFailure, NoCredentials, SafeMergeError
from .dirs import BYTES_READ, STAGED_TAG


@dataclass(frozen=True)
class S3Settings:
    """Where S3 is; credentials are deliberately absent: boto3's standard chain supplies them."""

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 8  # botocore's standard retry mode: exponential backoff with jitter


def _s3_client(settings: S3Settings) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": settings.max_attempts},
                    connect_timeout=10, read_timeout=60)
    return boto3.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config)


class S3Dir:
    """An s3://bucket/prefix/ 'directory'. One LIST gives sizes and ETags; tensors come by ranged GET."""

    local_path: Path | None = None  # nothing of it is on this machine's disk

    def __init__(self, uri: str, settings: S3Settings = S3Settings(), client: Any = None):
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

    def arrow_location(self, name: str) -> tuple[str, object | None]:
        import pyarrow.fs

        endpoint = self.settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")  # boto3 reads it; pyarrow not
        kwargs: dict = {"region": self.settings.region} if self.settings.region else {}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        return f"{self.bucket}/{self.prefix}{name}", pyarrow.fs.S3FileSystem(**kwargs)

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _s3_client(self.settings)
        return self._client

    def __getstate__(self) -> dict:  # travels to Ray workers as its location; clients are rebuilt there
        return {"uri": self.uri, "settings": self.settings}

    def __setstate__(self, state: dict) -> None:
        S3Dir.__init__(self, state["uri"], state["settings"])

    def _call(self, what: str, fn: Callable, absent: tuple[str, ...] = (), **kwargs: Any) -> Any:
        """fn(Bucket=..., **kwargs) with botocore's errors as this tool's; an error code in `absent` (a failed
        condition, a missing object) returns None."""
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
            if code in absent:
                return None
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

    def links(self) -> builtins.list[str]:
        return []  # S3 has no links

    def child(self, name: str) -> S3Dir:
        return S3Dir(f"{self.uri}{name.strip('/')}/", self.settings, self._client)

    def write(self, name: str, data: bytes, staged: bool = False) -> None:
        extra: dict[str, Any] = {"Tagging": STAGED_TAG} if staged else {}
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

    def write_all(self, files: dict[str, bytes], last: str) -> None:
        for name, data in files.items():
            if name != last:
                self.write(name, data)
        self.write(last, files[last])

    def create_exclusive(self, name: str, data: bytes) -> str | None:
        resp = self._call(f"{self.uri}{name}", self.client.put_object, absent=_FAILED_CONDITION, Key=self.prefix + name,
                          Body=data, IfNoneMatch="*")
        self._entries = self._dirs = None
        return None if resp is None else resp.get("ETag")

    def read_tagged(self, name: str) -> tuple[bytes, str] | None:
        resp = self._call(f"{self.uri}{name}", self.client.get_object, absent=_MISSING, Key=self.prefix + name)
        return None if resp is None else (resp["Body"].read(), resp["ETag"])

    def replace_if_match(self, name: str, data: bytes, tag: str) -> str | None:
        resp = self._call(f"{self.uri}{name}", self.client.put_object, absent=_FAILED_CONDITION + _MISSING,
                          Key=self.prefix + name, Body=data, IfMatch=tag)
        self._entries = self._dirs = None
        return None if resp is None else resp.get("ETag")


_MISSING = ("404", "NoSuchKey", "NotFound")
_FAILED_CONDITION = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")  # another writer won
