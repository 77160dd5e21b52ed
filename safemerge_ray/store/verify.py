"""Verification: every published object is recorded in its run's manifest with its sha256, size and version tag
(the S3 ETag, or size and mtime locally). Writing reads each object back and checks its sha256 before the
pointer may move; each night compares version tags (a listing, no download) to find damaged or deleted
adapters and redoes them; `safemerge-ray verify` re-reads and re-hashes on demand."""

from __future__ import annotations

from ..errors import EnvironmentFailure, SafeMergeError
from ..io import Dir, read_json, sha256_of
from .layout import check_run_id, key_uri, manifest_key, missing_run, pointer_key, published_names, read_pointer


def write_verified(out: Dir, key: str, data: bytes, staged: bool = False) -> dict:
    """Write one object, read it back, and return its manifest entry; a mismatch is an EnvironmentFailure."""
    out.write(key, data, staged=staged)
    try:
        back = out.read(key)
    except SafeMergeError as exc:
        raise EnvironmentFailure(f"{key_uri(out, key)} did not read back after writing: {exc}") from None
    if back != data:
        raise EnvironmentFailure(f"{key_uri(out, key)} read back different bytes than were written")
    return {"sha256": sha256_of(data), "bytes": len(data), "version": out.version_tag(key)}


def cached_manifest(out: Dir, key: str, manifests: dict[str, dict | None]) -> dict | None:
    """A run's manifest by key, read once per run however many adapters point at it."""
    if key not in manifests:
        manifests[key] = read_json(out, key) if key else None
    return manifests[key]


def published_damage(out: Dir, adapter: str, pointer: dict, manifests: dict[str, dict | None],
                     rehash: bool = False) -> str | None:
    """None if the adapter its pointer names is published intact: its manifest's objects, by version tag (a
    listing), or with `rehash` read again and hashed (what finds damage that kept size and mtime).
    `manifests` caches the runs' manifests across adapters."""
    key = str(pointer.get("manifest", ""))
    entry = (cached_manifest(out, key, manifests) or {}).get("adapters", {}).get(adapter)
    if not entry:
        return f"its published run's manifest ({key or 'none'}) is missing or does not list it"
    if rehash:
        problems = verify_objects(out, entry.get("objects", {}))
        return problems[0] if problems else None
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
    def manifest_at(key: str, why: str = "") -> dict:
        manifest = read_json(out, key)
        if manifest is None:
            raise SafeMergeError(f"verify: no readable manifest at {key_uri(out, key)}{why}")
        return manifest

    if run is not None:
        check_run_id(run, "verify --run")
        manifest = manifest_at(manifest_key(run), f" (run {run}: {missing_run(out, run)})")
        objects = dict(manifest.get("objects", {}))
        for entry in manifest.get("adapters", {}).values():
            objects.update(entry.get("objects", {}))
        return [(f"run {run}", verify_objects(out, objects))]
    names = [adapter] if adapter else published_names(out)
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
