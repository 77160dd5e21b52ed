"""Planning a fleet run from headers, pointers and manifests only (no tensor is read, no Ray started): each
adapter is unchanged (its published output is still right and intact), pending (and why), or failed; then
one scoring job per module for the pending ones."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from .. import __version__
from ..core import POLICIES, MergeSettings, ModuleCost
from ..engine import ModulePlan, ModuleScore, plan_adapter
from ..errors import SafeMergeError
from ..io import Checkpoint, Dir, load_adapter, open_dir, published_version, sha256_of
from ..store import NextRun, Planned, cached_manifest, published_damage, read_pointer
from .config import AdapterRef, FleetConfig
from .jobs import Deadline, Failure, ModuleJob, ScoreRequest

if TYPE_CHECKING:
    from ray import ObjectRef


class AdapterStatus(StrEnum):
    """Where one adapter is in a run."""

    PENDING = "pending"  # to be repaired
    UNCHANGED = "unchanged"  # its published output is still right
    ASSEMBLED = "assembled"  # written (staged), not yet committed
    COMMITTED = "committed"
    HELD = "held"  # written, but held back by the gate: not published
    FAILED = "failed"

    @property
    def usable(self) -> bool:
        """Whether consumers have a right adapter after the run (exit status 0 counts these)."""
        return self in (AdapterStatus.COMMITTED, AdapterStatus.UNCHANGED, AdapterStatus.ASSEMBLED)


_NEXT = {AdapterStatus.PENDING: NextRun.REDO, AdapterStatus.UNCHANGED: NextRun.UNCHANGED,
         AdapterStatus.FAILED: NextRun.FAILED}


@dataclass
class AdapterState:
    ref: AdapterRef
    settings: MergeSettings
    fingerprint: str = ""
    run_key: str = ""
    plans: list[ModulePlan] = field(default_factory=list)
    status: AdapterStatus = AdapterStatus.PENDING
    reason: str = ""
    environment: bool = False  # failed because of the store or a disk, not the adapter
    previous_run: str | None = None
    why: list[str] = field(default_factory=list)  # why it is redone: "new", "adapter changed", ...
    scores: dict[str, ModuleScore] = field(default_factory=dict)
    carried: dict[str, ObjectRef] = field(default_factory=dict)  # module -> (projected B, repaired layer), Ray's store
    objects: dict = field(default_factory=dict)  # written object -> {sha256, bytes}
    decisions: pa.Table | None = None  # columnar: a few bytes per module, not a dict per row
    counts: dict = field(default_factory=dict)
    gate: dict | None = None  # the gate's numbers for this adapter (harmful rate, task score, passed)

    def fail(self, failure: Failure) -> None:
        self.status, self.reason, self.environment = AdapterStatus.FAILED, failure.reason, failure.environment


def run_key(fingerprints: dict, adapter_fp: str, settings: MergeSettings) -> str:
    """What an adapter's output depends on; an equal key means the committed output is still right."""
    return sha256_of(json.dumps({"tool": __version__, "inputs": fingerprints, "adapter": adapter_fp,
                                 "settings": settings.to_dict()}, sort_keys=True).encode())


def why_redo(pointer: dict | None, manifest: dict | None, name: str, fingerprints: dict, adapter_fp: str,
             settings: MergeSettings) -> list[str]:
    """Why an adapter is redone, against the run that published it: what a person reads in the summary."""
    if pointer is None:
        return ["new"]
    manifest = manifest or {}
    entry = manifest.get("adapters", {}).get(name)
    if not entry:
        return ["its published run's manifest is missing or does not list it"]
    why = []
    if manifest.get("version") != __version__:
        why.append(f"tool version changed ({manifest.get('version')} -> {__version__})")
    inputs = manifest.get("inputs", {})
    for role, what in (("unaligned_model", "model changed"), ("aligned_model", "model changed"),
                       ("safety_adapter", "safety adapter changed")):
        if (inputs.get(role) or {}).get("fingerprint") != fingerprints[role] and what not in why:
            why.append(what)
    if entry.get("fingerprint") != adapter_fp:
        why.append("adapter changed")
    old, new = entry.get("settings") or {}, json.loads(json.dumps(settings.to_dict()))  # as the manifest has it
    changed = [f"{k} {old.get(k)} -> {new[k]}" for k in sorted(new) if old.get(k) != new[k]]
    if changed:
        why.append(f"settings changed ({', '.join(changed)})")
    return why or ["its pointer's run key differs"]


@dataclass
class FleetPlan:
    """What a run will do, from headers, pointers and manifests only (no tensor is read, no Ray started)."""

    states: list[AdapterState]
    fingerprints: dict
    warnings: list[str]

    @property
    def pending(self) -> list[AdapterState]:
        return self.by_status(AdapterStatus.PENDING)

    def by_status(self, status: AdapterStatus) -> list[AdapterState]:
        return [st for st in self.states if st.status == status]

    def next_runs(self) -> dict[str, Planned]:
        """What the next run would do with each adapter, as `status --config` shows it."""
        return {st.ref.name: Planned(_NEXT[st.status], st.reason if st.status == AdapterStatus.FAILED
                                     else "; ".join(st.why)) for st in self.states}


def plan_fleet(config: FleetConfig, out: Dir, deadline: Deadline | None = None, redo_all: bool = False,
               rehash: bool = False) -> FleetPlan:
    """Every adapter: unchanged (its published output is still right and intact), pending (and why), or
    failed (unreadable or invalid, alone). `redo_all`: every valid adapter is pending (a sweep). `rehash`:
    "intact" means every published byte hashes as its manifest says, not only the version tags."""
    deadline = deadline or Deadline(None)
    s3 = config.s3
    refs, skipped = config.scan_adapters()
    if not refs:
        raise SafeMergeError(f"{config.source}: finetuned: no adapters found")
    if out.local_path is not None:
        check_output_outlives_job(out.local_path)
    unaligned = Checkpoint(open_dir(config.unaligned_model, what="unaligned model", s3=s3), "unaligned model")
    aligned = Checkpoint(open_dir(config.aligned_model, what="aligned model", s3=s3), "aligned model")
    safety = (load_adapter(open_dir(config.safety_adapter, what="safety adapter", s3=s3), "safety adapter")
              if config.safety_adapter else None)
    fingerprints = {"unaligned_model": unaligned.fingerprint(), "aligned_model": aligned.fingerprint(),
                    "safety_adapter": safety.fingerprint if safety else None}
    warnings = skipped + [f"overrides.{n}: no adapter of that name in this fleet"
                          for n in config.overrides if n not in {r.name for r in refs}]

    states = [AdapterState(ref, config.settings_for(ref.name)) for ref in refs]
    manifests: dict[str, dict | None] = {}  # committed runs' manifests, read once each
    layouts: dict[str, list[ModulePlan]] = {}  # adapters of one layout share their plan (read-only)
    for st in states:
        if deadline.passed():  # a slow store: what is not planned by now is not done tonight
            st.fail(deadline.failure("planned"))
            continue
        try:
            adapter = load_adapter(open_dir(st.ref.uri, what=f"adapter {st.ref.name}", s3=s3), f"adapter {st.ref.name}")
            st.fingerprint = adapter.fingerprint
            st.run_key = run_key(fingerprints, adapter.fingerprint, st.settings)
            pointer = read_pointer(out, st.ref.name)  # damaged: the adapter is redone
            st.previous_run = pointer.get("run_id") if pointer else None
            if pointer and pointer.get("run_key") == st.run_key and not redo_all:
                damage = published_damage(out, st.ref.name, pointer, manifests, rehash)
                if damage is None:
                    st.status = AdapterStatus.UNCHANGED
                    continue
                warnings.append(f"{st.ref.name}: {damage}; redoing it")
                st.why = [f"published copy damaged: {damage}"]
            else:
                manifest = cached_manifest(out, str(pointer.get("manifest", "")), manifests) if pointer else None
                st.why = why_redo(pointer, manifest, st.ref.name, fingerprints, adapter.fingerprint, st.settings)
            if adapter.layout not in layouts:
                layouts[adapter.layout] = plan_adapter(unaligned, aligned, adapter, safety)
            st.plans = layouts[adapter.layout]
        except SafeMergeError as exc:  # unreadable or invalid: this adapter fails alone
            st.fail(Failure.of(exc))
    return FleetPlan(states, fingerprints, warnings)


def pin_safety_adapter(config: FleetConfig) -> FleetConfig:
    """A `train-safety` output given as the safety adapter stands for the version its manifest names when
    the run starts: every stage and worker reads that version, and the run's manifest names it."""
    if not config.safety_adapter:
        return config
    store = published_version(open_dir(config.safety_adapter, what="safety adapter", s3=config.s3),
                              "safety adapter")
    return replace(config, safety_adapter=store.uri)


def check_output_outlives_job(out: Path) -> None:
    """A relative output in a config that travelled in a `ray job submit` working dir lands in Ray's
    temporary copy of it, which Ray deletes: refuse before any work."""
    parts = out.parts
    if "runtime_resources" in parts or any(p.startswith("_ray_pkg_") for p in parts):
        raise SafeMergeError(
            f"output: {out} is inside Ray's temporary copy of the job's working dir and would be deleted "
            "with it; give the output as an absolute path on a shared filesystem or as s3://"
        )


def plan_jobs(pending: list[AdapterState], safety: str | None = None) -> list[ModuleJob]:
    """One job per target module, naming every pending adapter that needs it."""
    by_module: dict[str, list[tuple[ModulePlan, ScoreRequest]]] = {}
    for st in pending:
        request = ScoreRequest(st.ref.name, st.ref.uri, st.settings)  # one per adapter, shared by its modules
        for plan in st.plans:
            by_module.setdefault(plan.module, []).append((plan, request))
    jobs = []
    for module, items in by_module.items():
        first = items[0][0]
        cost = ModuleCost(module, *first.shape, first.nbytes, tuple(p.lora.rank for p, _ in items),
                          sum(POLICIES[req.settings.policy].needs_projection for _, req in items))
        jobs.append(ModuleJob(module, first.weight_key, first.transpose, first.nbytes,
                              tuple(req for _, req in items), cost, safety))
    return jobs
