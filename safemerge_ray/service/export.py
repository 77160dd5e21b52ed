"""Published adapters handed to serving: `safemerge-ray export OUTPUT --to DEST`.

    DEST/<adapter>@<run_id>/   adapter_config.json, adapter_model.safetensors (the published bytes, checked
                               against the run's manifest as they are copied) and export.json (written last)
    DEST/<adapter>             local DEST only: a relative symlink to the adapter's current version
    DEST/index.json            adapter -> its current versioned name, written after everything else

A version appears whole or not at all: locally it is written into a hidden directory in DEST and renamed into
place (vLLM's filesystem resolver and `--lora-modules name=path` never see half an adapter); on S3 its
objects come first and its export.json last (LoRAX loads `s3://.../<adapter>@<run_id>` as an adapter id).
Versions already exported are skipped; old ones stay until `--keep N`. See docs/serving.md.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from ..errors import EnvironmentFailure, SafeMergeError
from ..io import Dir, S3Settings, json_bytes, local_path, open_dir, read_json, sha256_of
from ..store import (
    adapter_prefix,
    cached_manifest,
    check_run_id,
    key_uri,
    published_names,
    read_pointer,
    split_versioned_name,
    utc_now,
    versioned_name,
)

EXPORTED = "export.json"  # a version's last object: without it, a version is not there (S3 has no renames)
INDEX = "index.json"  # adapter -> current versioned name: what an S3 reader follows (no symlinks there)
_LEFTOVER_S = 3600  # hidden leftovers of an export that was killed are removed after an hour


class ExportOutcome(StrEnum):
    EXPORTED = "exported"
    PRESENT = "already there"
    FAILED = "failed"


@dataclass
class ExportedAdapter:
    adapter: str
    outcome: ExportOutcome
    version: str | None = None
    detail: str = ""  # why it failed


@dataclass
class ExportReport:
    dest: str
    adapters: list[ExportedAdapter] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # versions `--keep` removed

    def count(self, outcome: ExportOutcome) -> int:
        return sum(1 for a in self.adapters if a.outcome == outcome)


class MovingNames(Protocol):
    """How a destination names each adapter's current version and drops old versions, beyond index.json."""

    def point(self, adapter: str, version: str) -> None: ...

    def retire(self, version: str) -> None: ...


class LinkedNames:
    """A local DEST: `DEST/<adapter>` is a symlink to its current version, swapped in one rename; an old version
    is renamed to a hidden name before it is removed, so no served name ever shows half a directory.
    Local only, by nature (S3 has no links), so it lives here rather than in the `Dir` interface."""

    def __init__(self, root: Path):
        self.root = root

    def point(self, adapter: str, version: str) -> None:
        link = self.root / adapter
        if link.is_symlink() and os.readlink(link) == version:
            return  # already there: a reader's name is not churned
        if link.exists() and not link.is_symlink():
            raise SafeMergeError(f"{link} is not a link export made; refusing to replace it ({version} was "
                                 "exported beside it)")
        tmp = self.root / f".link-{uuid.uuid4().hex[:12]}"
        os.symlink(version, tmp)  # relative: a shared volume is mounted at other paths in other containers
        try:
            os.replace(tmp, link)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def retire(self, version: str) -> None:
        gone = self.root / f".retired-{uuid.uuid4().hex[:12]}"
        os.rename(self.root / version, gone)
        shutil.rmtree(gone, ignore_errors=True)

    def sweep(self) -> None:
        """Hidden leftovers of an export that was killed (a version half written, one half removed)."""
        cutoff = time.time() - _LEFTOVER_S
        for path in self.root.glob(".*"):
            ours = path.name.startswith((".retired-", ".link-")) or ".partial-" in path.name
            if ours and path.lstat().st_mtime < cutoff:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


class IndexedNames:
    """An S3 DEST: no links; index.json names the current versions. An old version loses its export.json first,
    so a reader that checks for it never takes a version being removed."""

    def __init__(self, dest: Dir):
        self.dest = dest

    def point(self, adapter: str, version: str) -> None:
        pass  # index.json, written last, is the name

    def retire(self, version: str) -> None:
        self.dest.delete([f"{version}/{EXPORTED}"])
        self.dest.delete(self.dest.walk(f"{version}/"))


@dataclass
class ExportTarget:
    dir: Dir
    names: MovingNames


def open_target(location: str, s3: S3Settings = S3Settings()) -> ExportTarget:
    """DEST as a `Dir`, with how it names current versions: where it lives decides, once, here."""
    if location.startswith("s3://"):
        dest = open_dir(location, what="export --to", s3=s3, must_exist=False)
        dest.list()  # a missing bucket or no credentials: one error now, not one per adapter
        return ExportTarget(dest, IndexedNames(dest))
    root = Path(local_path(location))
    if root.exists() and not root.is_dir():
        raise SafeMergeError(f"export --to: {root} exists and is not a directory")
    if not root.parent.is_dir():
        raise SafeMergeError(f"export --to: parent directory {root.parent} does not exist")
    root.mkdir(exist_ok=True)
    names = LinkedNames(root)
    names.sweep()
    return ExportTarget(open_dir(str(root), what="export --to"), names)


def export_published(out: Dir, target: ExportTarget, only: list[str] | None = None,
                     keep: int | None = None) -> ExportReport:
    """Export every published adapter (or `only` these) under its versioned name, point its moving name at it,
    write index.json, then (with `keep`) remove all but the newest `keep` versions of each adapter exported,
    never its current one. One adapter's failure (damaged source bytes) leaves nothing of it and stops no other."""
    if keep is not None and keep < 1:
        raise SafeMergeError(f"export --keep: must be at least 1 (the current version is always kept); got {keep}")
    published = published_names(out)
    names = sorted(set(only)) if only else published
    missing = sorted(set(names) - set(published))
    if missing:
        raise SafeMergeError(f"export --only: {out.uri} publishes no adapter named {missing[0]!r} "
                             f"(no latest/{missing[0]}.json; see `safemerge-ray status`)")
    if not names:
        raise SafeMergeError(f"export: {out.uri} has no published adapters (no latest/*.json)")
    report = ExportReport(target.dir.uri)
    manifests: dict[str, dict | None] = {}
    for name in names:
        try:
            version, outcome = _export_one(out, target, name, manifests)
            target.names.point(name, version)
            report.adapters.append(ExportedAdapter(name, outcome, version))
        except (SafeMergeError, OSError) as exc:
            report.adapters.append(ExportedAdapter(name, ExportOutcome.FAILED, detail=str(exc)))
    current = _write_index(out, target.dir, report)
    if keep is not None:
        for a in report.adapters:
            if a.outcome != ExportOutcome.FAILED:
                report.removed += _prune(target, a.adapter, current[a.adapter], keep)
    return report


def _export_one(out: Dir, target: ExportTarget, name: str,
                manifests: dict[str, dict | None]) -> tuple[str, ExportOutcome]:
    """(versioned name, outcome) of one adapter's current version, written whole unless already there."""
    if name == INDEX:  # its link would be the index's name
        raise SafeMergeError(f"an adapter named {INDEX} cannot be exported beside the index; rename it")
    pointer = read_pointer(out, name)
    if pointer is None:
        raise SafeMergeError(f"{key_uri(out, f'latest/{name}.json')} is missing or not JSON")
    run_id = check_run_id(str(pointer.get("run_id", "")), f"latest/{name}.json")
    version = versioned_name(name, run_id)
    entry = (cached_manifest(out, str(pointer.get("manifest", "")), manifests) or {}).get("adapters", {}).get(name)
    if not entry:
        raise EnvironmentFailure(f"run {run_id}'s manifest is missing or does not list {name}")
    expected = _expected_files(name, run_id, entry.get("objects", {}))
    vdir = target.dir.child(version)
    if _already_exported(vdir, expected):
        return version, ExportOutcome.PRESENT
    files = {}
    for fname, meta in expected.items():  # every byte checked before any is written: nothing partial
        key = adapter_prefix(run_id, name) + fname
        data = out.read(key)
        if len(data) != meta["bytes"] or sha256_of(data) != meta["sha256"]:
            raise EnvironmentFailure(f"{key_uri(out, key)}: sha256 or size differs from the manifest (damaged "
                                     f"since it was published; `safemerge-ray verify`); {version} not exported")
        files[fname] = data
    files[EXPORTED] = json_bytes({"tool": "safemerge-ray", "adapter": name, "run_id": run_id, "version": version,
                                  "source": out.uri, "exported_at": utc_now(), "objects": expected})
    vdir.write_all(files, last=EXPORTED)  # local: one rename of a hidden directory; S3: export.json last
    return version, ExportOutcome.EXPORTED


def _expected_files(name: str, run_id: str, objects: dict[str, dict]) -> dict[str, dict]:
    """{file name: {sha256, bytes}} of an adapter's published objects, from its run's manifest."""
    prefix = adapter_prefix(run_id, name)
    expected = {key[len(prefix):]: {"sha256": meta["sha256"], "bytes": meta["bytes"]}
                for key, meta in objects.items() if key.startswith(prefix)}
    if not expected or any("/" in f or f == EXPORTED for f in expected):
        raise EnvironmentFailure(f"run {run_id}'s manifest lists no usable objects for {name}")
    return expected


def _already_exported(vdir: Dir, expected: dict[str, dict]) -> bool:
    """A version written whole before: its export.json records these hashes and each file has its size (cheap:
    a stat or a listing; a size that differs, or a file gone, exports it again)."""
    marker = read_json(vdir, EXPORTED) if vdir.exists(EXPORTED) else None
    if marker is None or marker.get("objects") != expected:
        return False
    return all(vdir.exists(f) and vdir.size(f) == meta["bytes"] for f, meta in expected.items())


def _write_index(out: Dir, dest: Dir, report: ExportReport) -> dict[str, str]:
    """index.json, after every version and link: this export's current versions over the previous index's
    (adapters not exported this time, or failed, keep their entries)."""
    previous = read_json(dest, INDEX) or {}
    current = {k: v for k, v in (previous.get("adapters") or {}).items() if isinstance(v, str)}
    current.update({a.adapter: a.version for a in report.adapters if a.version})
    dest.write(INDEX, json_bytes({"tool": "safemerge-ray", "source": out.uri, "exported_at": utc_now(),
                                  "adapters": dict(sorted(current.items()))}))
    return current


def _prune(target: ExportTarget, adapter: str, current: str, keep: int) -> list[str]:
    """Remove all but the newest `keep` versions of `adapter` in DEST, never `current`: the versions removed."""
    versions = sorted((d for d in target.dir.subdirs() if (split_versioned_name(d) or ("",))[0] == adapter),
                      key=lambda d: d.split("@", 1)[1], reverse=True)  # run ids sort by their start time
    kept = set(versions[:keep]) | {current}
    removed = [v for v in versions if v not in kept]
    for version in removed:
        target.names.retire(version)
    return removed
