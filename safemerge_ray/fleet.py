"""The fleet job: one Ray run repairs every fine-tune against one shared safety adapter.

    plan    (driver, safetensors headers only)
 -> score   (worker actors, module-major: each module's two weights are read once, by one worker, and
             every pending adapter is scored against them in one batch; only scores travel back)
 -> decide + assemble (one task per adapter on the same workers, adapter-major; it writes its adapter)
 -> commit  (the run's decisions and summary, then `manifest.json` last, then per-adapter pointers)

A run without its manifest did not happen; consumers follow `latest/<adapter>.json`, which moves only
after the manifest is written. Before any scoring, every worker checks that it can read every input
and write the output from its own node (`preflight`). Lost processes and nodes are retried by Ray
(actor restarts, actor task retries); errors in inputs never are: workers return them as values. An
adapter whose inputs are bad fails alone, with its reason in the run summary. Every run, even one with
nothing to do or one stopped by an error, leaves a run record (`status/last_run.json`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import os
import signal
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import torch

from . import __version__
from .adapters import FactorRows, LoraAdapter, load_adapter, read_factor_rows
from .assemble import ModuleScore, assemble_adapter
from .config import AdapterRef, FleetConfig
from .errors import EnvironmentFailure, NoCredentials, SafeMergeError, first_line
from .evaluate import Pair
from .memory import PROCESS_BASELINE, ModuleCost, available_memory, check_fits, fmt
from .merge import MergeSettings
from .output import (
    DECISIONS,
    SUMMARY,
    Published,
    RunLock,
    RunRecord,
    adapter_prefix,
    cached_manifest,
    commit_run,
    json_bytes,
    published_damage,
    read_pointer,
    run_prefix,
    utc_now,
    write_run_record,
    write_verified,
)
from .plan import ModulePlan, plan_adapter
from .policy import POLICIES
from .progress import LOG, Progress, log
from .repair import RepairInputs, delta_from_pair, read_weight_pair, resolve_device, score_module
from .report import counts, decisions_bytes, decisions_table
from .storage import BYTES_READ, Dir, LocalDir, S3Settings, open_dir, sha256_of
from .tensors import Checkpoint, natural_key, release_freed_buffers

if TYPE_CHECKING:
    from ray import ObjectRef

# 0: every adapter committed or unchanged; 3: some failed, the rest are usable; 4: none is usable.
# (2: bad config or shared input, 1: environment, 130: interrupted; both raised, not returned.)
EXIT_OK, EXIT_ENVIRONMENT, EXIT_PARTIAL, EXIT_FAILED = 0, 1, 3, 4


@dataclass(frozen=True)
class ScoreRequest:
    adapter: str
    uri: str
    settings: MergeSettings


@dataclass(frozen=True)
class ModuleJob:
    module: str
    weight_key: str
    transpose: bool
    nbytes: int
    requests: tuple[ScoreRequest, ...]
    cost: ModuleCost
    safety: str | None = None  # the safety adapter's URI: its layer is needed to score the repair's effect
    budget: int | None = None  # bytes a worker may use for this module's tensors: adapters are scored in chunks

    @property
    def factor_bytes(self) -> int:
        """Every request's (A, B) in float32."""
        return sum(4 * r * (self.cost.out_features + self.cost.in_features) for r in self.cost.ranks)


@dataclass(frozen=True)
class ScoreTask:
    """What one worker call scores: one large module, or neighbouring small ones whose factors each adapter
    reads in one go (a fleet of many small modules would otherwise pay a read per adapter and module)."""

    jobs: tuple[ModuleJob, ...]

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)

    @property
    def name(self) -> str:
        return self.jobs[0].module if len(self.jobs) == 1 else f"{self.jobs[0].module} .. {self.jobs[-1].module}"


# Every assembly reads the safety adapter's repaired layers: a worker keeps it in memory up to this size.
SAFETY_IN_MEMORY = 512 * 2**20

# Neighbouring modules share a task while their weights and all adapters' factors stay under this.
TASK_BYTES = 64 * 2**20


# A module's weights are read again after botocore's own retries have given up (a longer outage),
# before the adapters that need them fail: waits of 5, 15, 45 s, never past the run's deadline.
READ_RETRY_WAITS_S = (5.0, 15.0, 45.0)


@dataclass(frozen=True)
class Failure:
    """Why one adapter failed; `environment`: the store or a disk, not the adapter (exit status 1, not 4)."""

    reason: str
    environment: bool = False

    @staticmethod
    def of(exc: Exception) -> Failure:
        return Failure(str(exc), isinstance(exc, (EnvironmentFailure, OSError)))


@dataclass
class ModuleResult:
    module: str
    nbytes: int
    scores: dict[str, ModuleScore] = field(default_factory=dict)  # their projected B, if any, moved to:
    projected: dict[str, ObjectRef] = field(default_factory=dict)  # adapter -> SafeLoRA's projected B in Ray's store
    errors: dict[str, Failure] = field(default_factory=dict)
    batches: int = 0  # scoring batches (one per rank, more when the budget splits them)

    def stash_projected(self) -> None:
        """Move projected Bs into Ray's object store (this worker owns them): the driver gets references, and
        the assembly that needs one fetches it. Outside Ray (tests call a worker directly) they stay inline."""
        import ray

        if not ray.is_initialized():
            return
        for adapter, score in list(self.scores.items()):
            if score.projected_b is not None:
                self.projected[adapter] = ray.put(score.projected_b)
                self.scores[adapter] = score._replace(projected_b=None)


@dataclass(frozen=True)
class Problem:
    """Something a worker's node cannot do: "worker node {node} {verb} {location}: {cause}"."""

    node: str  # "10.0.0.5 (node 3f2a9c1b)"
    verb: str  # "cannot read", "cannot write to", "does not see", "cannot use"
    location: str
    cause: str


@dataclass(frozen=True)
class PreflightResult:
    node: str
    problems: list[Problem]
    node_id: str = ""
    memory_available: int = 0  # bytes this worker's node (or its container) still has


def format_problems(problems: list[Problem], limit: int = 20) -> list[str]:
    """One line per (node, what, cause); many inputs failing the same way on a node share a line."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for p in problems:
        locations = groups.setdefault((p.node, p.verb, p.cause), [])
        if p.location not in locations:
            locations.append(p.location)
    lines = [f"worker node {node} {verb} {locs[0]}{f' (and {len(locs) - 1} more)' if len(locs) > 1 else ''}: {cause}"
             for (node, verb, cause), locs in groups.items()]
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


class FleetWorker:
    """A Ray actor: checks its node (preflight), scores modules (module-major), then assembles adapters
    (adapter-major).

    It keeps both checkpoints' headers (and adapters' headers) where the scoring happens. While one
    module is scored, the next one's weights are already being read (one background thread: file and
    network reads and torch's GEMMs both release the GIL), so I/O hides under compute. Assembly runs
    on the same warm processes, so a run pays for one set of worker start-ups, not two. Nothing that
    depends on the inputs happens in `__init__`: a bad input must not look like a crashed actor to Ray,
    which would restart it.
    """

    def __init__(self, unaligned: str, aligned: str, s3: S3Settings, device: str, threads: int | None = None,
                 deadline: float | None = None):
        release_freed_buffers()
        self.deadline = deadline  # time.time() past which a failed read is not retried
        if threads:
            torch.set_num_threads(threads)
        self.s3, self.device = s3, device
        try:
            resolve_device(device)  # CUDA settings for this process; a device that is missing is for preflight
        except SafeMergeError:
            pass
        self.uris = {"unaligned model": unaligned, "aligned model": aligned}
        self.models: dict[str, Checkpoint] = {}
        self.adapters: dict[str, LoraAdapter] = {}
        self._plans: dict[str, list[ModulePlan]] = {}  # by adapter layout
        self._reader = ThreadPoolExecutor(max_workers=1)
        self._prefetched: dict[str, Future] = {}

    def _model(self, what: str) -> Checkpoint:
        if what not in self.models:
            self.models[what] = Checkpoint(open_dir(self.uris[what], what=what, s3=self.s3), what)
        return self.models[what]

    @property
    def unaligned(self) -> Checkpoint:
        return self._model("unaligned model")

    @property
    def aligned(self) -> Checkpoint:
        return self._model("aligned model")

    def _adapter(self, uri: str, what: str | None = None) -> LoraAdapter:
        """An adapter's config and header, read once per worker (the safety adapter's too)."""
        if uri not in self.adapters:
            self.adapters[uri] = load_adapter(open_dir(uri, what=what or f"adapter {uri}", s3=self.s3), what or uri)
        return self.adapters[uri]

    def preflight(self, adapters: list[str], safety: str | None, out: Dir | None,
                  marker: tuple[str, str] | None) -> PreflightResult:
        """From this worker's node: open every input (headers only; kept for scoring) and check that the
        output can be written. `marker` is a file the driver put in a local output, to prove that this
        node sees the same directory."""
        node, node_id = _node()
        problems = []
        try:
            resolve_device(self.device)
        except SafeMergeError as exc:
            problems.append(Problem(node, "cannot use", self.device, str(exc)))

        def check(item: tuple[str, str]) -> Problem | None:
            kind, key = item  # key: "unaligned model" / "aligned model" for a model, else the adapter's URI
            location = self.uris[key] if kind == "model" else key
            try:
                if kind == "model":
                    self._model(key)
                else:
                    self._adapter(key, "safety adapter" if kind == "safety" else None)
            except (SafeMergeError, OSError) as exc:  # OSError: e.g. files owned by another uid on that node
                return _cannot_read(node, location, exc)
            return None

        items = [("model", w) for w in self.uris] + ([("safety", safety)] if safety else [])
        with ThreadPoolExecutor(max_workers=8) as pool:  # latency-bound on S3: overlap the small reads
            problems += [p for p in pool.map(check, items + [("adapter", u) for u in adapters]) if p]
        problem = _check_output(node, node_id, out, marker) if out is not None else None  # None: writes nothing
        # The headers just read live as long as the worker: out of the cyclic GC's sight, which otherwise walks
        # them on every collection that the many small temporaries of scoring and assembly set off.
        gc.freeze()
        return PreflightResult(node, problems + ([problem] if problem else []), node_id, available_memory())

    def _read(self, job: ModuleJob) -> Future:
        return self._reader.submit(self._retrying, read_weight_pair, job.weight_key, self.unaligned, self.aligned,
                                   self.device)

    def _retrying(self, fn, *args):
        """fn(*args), tried again after each of READ_RETRY_WAITS_S when the store fails (not for bad input)."""
        for wait in (*READ_RETRY_WAITS_S, None):
            try:
                return fn(*args)
            except EnvironmentFailure:
                if wait is None or (self.deadline is not None and time.time() + wait > self.deadline):
                    raise
                time.sleep(wait)

    def bytes_read(self) -> int:
        """Everything this worker process has read (preflight headers, weights, adapters)."""
        return BYTES_READ.total

    def score(self, task: ScoreTask, next_task: ScoreTask | None = None) -> list[ModuleResult]:
        """Score a task's modules in order; each module's weights are read while the one before is scored
        (the next task's first one too)."""
        jobs = task.jobs
        nexts = [*jobs[1:], next_task.jobs[0] if next_task is not None else None]
        rows, failed = self._factor_rows(task) if len(jobs) > 1 else ({}, {})
        results = [self._score_job(job, after, rows, failed) for job, after in zip(jobs, nexts, strict=True)]
        for result in results:
            result.stash_projected()
        return results

    def _factor_rows(self, task: ScoreTask) -> tuple[dict[str, FactorRows], dict[str, Failure]]:
        """Every adapter's factors for all of a small-module task's modules, one read per adapter, in rows
        shared by the adapters of one layout: adapter URI -> its rows."""
        by_layout: dict[str, list[LoraAdapter]] = {}
        failed: dict[str, Failure] = {}
        for uri in dict.fromkeys(req.uri for job in task.jobs for req in job.requests):
            try:
                adapter = self._adapter(uri)
                by_layout.setdefault(adapter.layout, []).append(adapter)
            except SafeMergeError as exc:
                failed[uri] = Failure.of(exc)
        rows: dict[str, FactorRows] = {}
        for adapters in by_layout.values():
            modules = [job.module for job in task.jobs if job.module in adapters[0].modules]
            got, errors = read_factor_rows(adapters, modules, self._retrying)
            failed.update({uri: Failure.of(exc) for uri, exc in errors.items()})
            if got is not None:
                rows.update({uri: got for uri in got.index})
        return rows, failed

    def _score_job(self, job: ModuleJob, next_job: ModuleJob | None, rows: dict[str, FactorRows],
                   failed: dict[str, Failure]) -> ModuleResult:
        result = ModuleResult(job.module, job.nbytes)
        try:
            pending_read = self._prefetched.pop(job.module, None) or self._read(job)
            if next_job is not None and next_job.module not in self._prefetched:
                self._prefetched[next_job.module] = self._read(next_job)
            v = delta_from_pair(job, pending_read.result(), self.device)
        except SafeMergeError as exc:  # a bad or unreadable (after retries) weight fails every adapter needing it
            result.errors = {r.adapter: Failure.of(exc) for r in job.requests}
            return result
        try:
            safety = self._adapter(job.safety, "safety adapter") if job.safety else None
            has_layer = safety is not None and job.module in safety.modules
            safety_lora = self._retrying(safety.read_lora, job.module) if safety is not None and has_layer else None
            safety_scaling = safety.modules[job.module].scaling if safety is not None and has_layer else None
        except SafeMergeError as exc:  # shared by every adapter of this module
            result.errors = {r.adapter: Failure.of(exc) for r in job.requests}
            return result
        # Adapters are scored grouped by rank (no zero-padding to the largest), in chunks that keep this
        # worker under its budget; V serves every chunk, and each chunk's factors are read just before it.
        by_rank: dict[int, list[ScoreRequest]] = {}
        for req in job.requests:
            if req.uri in failed:  # its factors for this task could not be read
                result.errors[req.adapter] = failed[req.uri]
                continue
            try:  # headers only (kept since preflight, unless this worker was restarted)
                by_rank.setdefault(self._adapter(req.uri).modules[job.module].rank, []).append(req)
            except SafeMergeError as exc:
                result.errors[req.adapter] = Failure.of(exc)
        for rank in sorted(by_rank):
            group = by_rank[rank]
            size = job.cost.chunk(rank, job.budget)
            for start in range(0, len(group), size):
                ready, a_all, b_all = self._stacked(job.module, group[start:start + size], rows, result)
                if ready:
                    repairs = [RepairInputs(self._adapter(req.uri).modules[job.module].scaling, safety_lora,
                                            safety_scaling) for req in ready]
                    scores = score_module(job.module, v, a_all, b_all, [r.settings for r in ready], repairs)
                    result.scores.update({req.adapter: s for req, s in zip(ready, scores, strict=True)})
                    result.batches += 1
                del a_all, b_all
        return result

    def _stacked(self, module: str, chunk: list[ScoreRequest], rows: dict[str, FactorRows],
                 result: ModuleResult) -> tuple[list[ScoreRequest], torch.Tensor, torch.Tensor]:
        """A chunk's factors stacked ([N, r, in], [N, out, r]): views of rows read for the task where there
        are, else read adapter by adapter. Adapters that cannot be read fail alone (in `result`)."""
        ready: list[ScoreRequest] = []
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        by_rows: dict[int, list[ScoreRequest]] = {}
        for req in chunk:
            if req.uri in rows:
                by_rows.setdefault(id(rows[req.uri]), []).append(req)
                continue
            try:
                a, b = self._retrying(self._adapter(req.uri).read_lora, module)
                parts.append((a[None], b[None]))
                ready.append(req)
            except SafeMergeError as exc:
                result.errors[req.adapter] = Failure.of(exc)
        for reqs in by_rows.values():
            parts.append(rows[reqs[0].uri].stacks([r.uri for r in reqs], self._adapter(reqs[0].uri).modules[module]))
            ready += reqs
        if not parts:
            return [], torch.empty(0), torch.empty(0)
        if len(parts) == 1:
            return ready, *parts[0]
        return ready, torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])

    def assemble(self, name: str, uri: str, fingerprint: str, safety_uri: str | None, scores: dict[str, ModuleScore],
                 projected: dict[str, ObjectRef], settings: MergeSettings, out: Dir, prefix: str) -> AssemblyResult:
        """Decide, merge and write one adapter under `prefix` (staged until the commit). Its plan is made again
        here, from the headers this worker holds (the adapter's must be the one the driver planned)."""
        try:
            if projected:
                import ray

                fetched = ray.get(list(projected.values()))
                scores = {**scores, **{m: scores[m]._replace(projected_b=b)
                                       for m, b in zip(projected, fetched, strict=True)}}
            finetuned = self._adapter(uri, f"adapter {name}")
            if finetuned.fingerprint != fingerprint:
                raise SafeMergeError(f"adapter {name} changed while this run repaired it; the next run repairs it")
            safety = self._adapter(safety_uri, "safety adapter") if safety_uri else None
            if safety is not None and safety.factor_bytes <= SAFETY_IN_MEMORY:
                safety.keep_in_memory()
            if finetuned.layout not in self._plans:  # adapters of one layout share a plan
                self._plans[finetuned.layout] = plan_adapter(self.unaligned, self.aligned, finetuned, safety)
            plans = self._plans[finetuned.layout]
            result = assemble_adapter(name, plans, scores, finetuned, safety, settings)
            objects = {f"{prefix}{fname}": write_verified(out, f"{prefix}{fname}", data, staged=True)
                       for fname, data in result.files().items()}
        except (SafeMergeError, OSError) as exc:  # OSError: the output's disk (full, permissions)
            return AssemblyResult(name, error=Failure.of(exc))
        return AssemblyResult(name, objects=objects, decisions=decisions_table(result.decisions),
                              counts=counts(result.decisions))


@dataclass
class AssemblyResult:
    adapter: str
    error: Failure | None = None
    objects: dict[str, dict] = field(default_factory=dict)  # written object -> {sha256, bytes}
    decisions: pa.Table | None = None
    counts: dict = field(default_factory=dict)


def _node() -> tuple[str, str]:
    """("10.0.0.5 (node 3f2a9c1b)", the full node id): what error lines call this worker's node."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), "?")
    return f"{ip} (node {node_id[:8]})", node_id


_NO_CREDENTIALS = "no AWS credentials on the worker; give workers an IAM role (IRSA) or see README: credentials"


def _cause(exc: Exception) -> str:
    return _NO_CREDENTIALS if isinstance(exc, NoCredentials) else str(exc)


def _cannot_read(node: str, location: str, exc: Exception) -> Problem:
    if not isinstance(exc, NoCredentials) and not location.startswith("s3://") and os.path.isabs(location) \
            and not os.path.exists(location):
        return Problem(node, "cannot read", location, "no such directory on that node; a multi-node cluster needs "
                       "its inputs on S3 or a shared filesystem")
    return Problem(node, "cannot read", location, _cause(exc))


def _check_output(node: str, node_id: str, out: Dir, marker: tuple[str, str] | None) -> Problem | None:
    """None if this node can write the output (and, for a local output, sees the driver's directory)."""
    try:
        if marker is None:  # S3: one small object, overwritten by every node of every run; written and
            # unstaged the way a run's objects are, so a role without the tagging permissions fails here
            out.write("status/preflight.json", json_bytes({"node": node, "node_id": node_id, "checked_at": utc_now()}),
                      staged=True)
            out.unstage("status/preflight.json")
            return None
        name, token = marker
        if not out.exists(name) or out.read(name).decode() != token:
            return Problem(node, "does not see", f"the output directory {out.uri}",
                           "the driver's marker file is not there; a multi-node cluster needs an s3:// output or a "
                           "shared filesystem")
        probe = Path(out.uri) / f".preflight-write-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
        return None
    except (SafeMergeError, OSError) as exc:
        return Problem(node, "cannot write to", out.uri, _cause(exc))


@dataclass
class AdapterState:
    ref: AdapterRef
    settings: MergeSettings
    fingerprint: str = ""
    run_key: str = ""
    plans: list[ModulePlan] = field(default_factory=list)
    status: str = "pending"  # pending | unchanged | assembled | committed | held (by the gate) | failed
    reason: str = ""
    environment: bool = False  # failed because of the store or a disk, not the adapter
    previous_run: str | None = None
    why: list[str] = field(default_factory=list)  # why it is redone: "new", "adapter changed", ...
    scores: dict[str, ModuleScore] = field(default_factory=dict)
    projected: dict[str, ObjectRef] = field(default_factory=dict)  # module -> SafeLoRA's projected B (Ray's store)
    objects: dict = field(default_factory=dict)  # written object -> {sha256, bytes}
    decisions: pa.Table | None = None  # columnar: a few bytes per module, not a dict per row
    counts: dict = field(default_factory=dict)
    gate: dict | None = None  # the gate's numbers for this adapter (harmful rate, task score, passed)

    def fail(self, failure: Failure) -> None:
        self.status, self.reason, self.environment = "failed", failure.reason, failure.environment


MAX_FAILED_LINES = 100  # stdout stays readable (and small) when a config names 600k missing adapters


@dataclass
class FleetReport:
    run_id: str | None
    output: str
    adapters: list[AdapterState]
    exit_code: int
    warnings: list[str] = field(default_factory=list)
    bytes_read: int = 0  # by the driver and every worker process, measured in each
    record: RunRecord | None = None

    def by_status(self, status: str) -> list[str]:
        return [a.ref.name for a in self.adapters if a.status == status]

    def listed(self) -> tuple[list[AdapterState], int]:
        """The adapters a report lists (every one but failed ones past MAX_FAILED_LINES), and how many
        failed ones it leaves out: output stays small when a config names 600k missing adapters."""
        shown, failed = [], 0
        for st in self.adapters:
            failed += st.status == "failed"
            if st.status != "failed" or failed <= MAX_FAILED_LINES:
                shown.append(st)
        return shown, max(0, failed - MAX_FAILED_LINES)


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


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


def balance(tasks: list[ScoreTask], n: int) -> list[list[ScoreTask]]:
    """Split tasks into n shards of about equal bytes (largest first onto the lightest shard)."""
    shards: list[list[ScoreTask]] = [[] for _ in range(n)]
    loads = [0] * n
    for task in sorted(tasks, key=lambda t: (-t.nbytes, natural_key(t.jobs[0].module))):
        i = loads.index(min(loads))
        shards[i].append(task)
        loads[i] += task.nbytes
    return [sorted(s, key=lambda t: natural_key(t.jobs[0].module)) for s in shards if s]


def _log(msg: str, **fields) -> None:
    log("fleet", msg, **fields)


def run_fleet(config: FleetConfig, progress: bool = True, run_id: str | None = None,
              ray_address: str | None = None, runtime_env: dict | None = None,
              break_lock: bool = False) -> FleetReport:
    """Plan, score, assemble and commit; Ray is started or joined only when there is work.

    One run per output at a time (its lock; another run's lock is LockHeld, exit status 5). Whatever
    happens once the lock is held, a run record is written (`status/last_run.json`) and attached to
    the report, or to the error as `run_record`.
    """
    LOG.run_id = None  # set once this run has an id
    out = open_dir(config.output, what="output", s3=config.s3, must_exist=False)
    record = RunRecord(started_at=utc_now(), output=out.uri, config=config.source)
    lock = RunLock(out).acquire(break_lock=break_lock)
    try:
        return _run_locked(config, out, record, lock, progress, run_id, ray_address, runtime_env)
    finally:
        lock.release()


def _run_locked(config: FleetConfig, out: Dir, record: RunRecord, lock: RunLock, progress: bool,
                run_id: str | None, ray_address: str | None, runtime_env: dict | None) -> FleetReport:
    try:
        report = _run(config, out, progress, run_id, ray_address, runtime_env, lock)
    except SafeMergeError as exc:
        record.exit_status, record.error = exc.exit_code, str(exc)
        _save_record(out, record)
        exc.run_record = record
        raise
    except KeyboardInterrupt:  # also SIGTERM (`ray job stop`, a pod evicted): the CLI turns it into this
        record.exit_status, record.error = 130, "interrupted; pointers moved only for a completed commit"
        _save_record(out, record)
        raise
    except Exception as exc:  # a bug or an unexpected Ray error: keep its traceback, but say so in the record
        record.exit_status, record.error = 1, f"{type(exc).__name__}: {first_line(exc)}"
        _save_record(out, record)
        raise
    record.run_id, record.exit_status = report.run_id, report.exit_code
    record.counts = {"adapters": len(report.adapters),
                     **{s: len(report.by_status(s)) for s in ("committed", "unchanged", "held", "failed")}}
    record.set_failed({st.ref.name: st.reason for st in report.adapters if st.status == "failed"})
    record.set_held({st.ref.name: st.reason for st in report.adapters if st.status == "held"})
    record.warnings = report.warnings[:100]
    problem = _save_record(out, record)
    if problem:
        report.warnings.append(problem)
        report.exit_code = report.exit_code or 1  # a run nobody can see did not go well
        record.exit_status, record.error = report.exit_code, problem  # what --summary-json and submit see
    report.record = record
    return report


def _save_record(out: Dir, record: RunRecord) -> str | None:
    record.ended_at = utc_now()
    try:
        write_run_record(out, record)
    except (SafeMergeError, OSError) as exc:
        return f"the run record could not be written to {out.uri}: {exc}"
    return None


def exit_status(states: list[AdapterState]) -> int:
    """0: every adapter is usable (committed or unchanged); 3: some failed or were held back by the gate;
    4: none is usable; 1: none is usable and every failure was the environment's (an S3 outage, a full disk)."""
    failed = [st for st in states if st.status in ("failed", "held")]
    if not failed:
        return EXIT_OK
    if len(failed) < len(states):
        return EXIT_PARTIAL
    return EXIT_ENVIRONMENT if all(st.environment for st in failed) else EXIT_FAILED


@dataclass
class FleetPlan:
    """What a run will do, from headers, pointers and manifests only (no tensor is read, no Ray started)."""

    states: list[AdapterState]
    fingerprints: dict
    warnings: list[str]

    @property
    def pending(self) -> list[AdapterState]:
        return [st for st in self.states if st.status == "pending"]


def plan_fleet(config: FleetConfig, out: Dir, deadline: Deadline | None = None, redo_all: bool = False) -> FleetPlan:
    """Every adapter: unchanged (its published output is still right and intact), pending (and why), or
    failed (unreadable or invalid, alone). `redo_all`: every valid adapter is pending (a sweep)."""
    deadline = deadline or Deadline(None)
    s3 = config.s3
    refs, skipped = config.scan_adapters()
    if not refs:
        raise SafeMergeError(f"{config.source}: finetuned: no adapters found")
    if isinstance(out, LocalDir):
        _check_output_outlives_job(out)
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
                damage = published_damage(out, st.ref.name, pointer, manifests)
                if damage is None:
                    st.status = "unchanged"
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


def _run(config: FleetConfig, out: Dir, progress: bool, run_id: str | None, ray_address: str | None,
         runtime_env: dict | None, lock: RunLock) -> FleetReport:
    driver_before = BYTES_READ.total
    deadline = Deadline(config.max_run_seconds)
    plan = plan_fleet(config, out, deadline)
    states, fingerprints, warnings, pending = plan.states, plan.fingerprints, plan.warnings, plan.pending
    _log(f"{len(states)} adapters: {len(pending)} to repair, "
         f"{sum(st.status == 'unchanged' for st in states)} unchanged, "
         f"{sum(st.status == 'failed' for st in states)} invalid")
    if not pending:
        warnings += deadline.warnings()
        return FleetReport(None, out.uri, states, exit_status(states), warnings, BYTES_READ.total - driver_before)

    if config.gate is not None:  # the gate's prompt files and judge, before an hour of work needs them
        from .evaluate import read_prompt_sets

        read_prompt_sets(config.gate.eval, config.s3)
    run_id = LOG.run_id = run_id or new_run_id()
    init_ray(ray_address, runtime_env, quiet=not progress)
    jobs = _plan_jobs(pending, config.safety_adapter)
    for st in pending:
        st.plans = []  # the worker that assembles an adapter plans it again from the headers it holds
    with _scored(config, out, pending, jobs, progress, deadline) as workers:
        _assemble(config, workers, out, run_id, [st for st in pending if st.status == "pending"], progress, deadline)
        worker_bytes = 0 if deadline.passed() else _worker_bytes(workers)  # late workers may still be busy
    evaluation = _gate(config, out, run_id, states, deadline) if config.gate is not None else None
    warnings += deadline.warnings()
    report = FleetReport(run_id if any(st.status in ("assembled", "held") for st in states) else None,
                         out.uri, states, EXIT_OK, warnings)
    if report.run_id:
        if lock.lost:  # another run may be writing pointers now: ours must not move
            raise EnvironmentFailure(f"{lock.lost}; this run committed nothing")
        _commit(config, out, report.run_id, states, fingerprints, report, evaluation)
    report.bytes_read = BYTES_READ.total - driver_before + worker_bytes
    report.exit_code = exit_status(states)
    return report


def score_fleet(config: FleetConfig, progress: bool = True, ray_address: str | None = None,
                runtime_env: dict | None = None) -> tuple[dict[str, dict[str, float]], FleetPlan]:
    """Every valid adapter's rho per module, scored once on Ray whatever is published; writes nothing.
    (SafeLoRA adapters are scored as SafeMERGE ones: rho is the same, and no projection is needed.)"""
    out = open_dir(config.output, what="output", s3=config.s3, must_exist=False)
    plan = plan_fleet(config, out, redo_all=True)
    pending = plan.pending
    if not pending:
        return {}, plan
    for st in pending:
        st.settings = replace(st.settings, policy="safemerge")
    init_ray(ray_address, runtime_env, quiet=not progress)
    # No safety adapter and no output: rho alone, not the repairs' effect, and nothing written.
    with _scored(config, None, pending, _plan_jobs(pending), progress, Deadline(config.max_run_seconds)):
        pass
    return {st.ref.name: {m: s.rho for m, s in st.scores.items()} for st in pending if st.status == "pending"}, plan


@contextlib.contextmanager
def _scored(config: FleetConfig, out: Dir | None, pending: list[AdapterState], jobs: list[ModuleJob],
            progress: bool, deadline: Deadline):
    """Start the workers, check them (preflight, memory), score every pending adapter, and yield the warm
    workers for what follows; they are killed on the way out, whatever happens."""
    import ray

    workers = _start_workers(config, len(jobs), deadline.at)
    try:
        jobs = check_memory(config, jobs, _preflight(config, out, workers, pending))
        _score(workers, jobs, pending, progress, deadline)
        yield workers
    finally:
        for worker in workers:
            ray.kill(worker)


def _worker_bytes(workers: list) -> int:
    """Bytes read by the live workers (a worker lost and restarted counts from its restart)."""
    import ray

    total = 0
    for worker in workers:
        try:
            total += ray.get(worker.bytes_read.remote(), timeout=60)
        except ray.exceptions.RayError:
            pass  # lost: its adapters already failed, and the accounting is not worth a failed run
    return total


def _check_output_outlives_job(out: LocalDir) -> None:
    """A relative output in a config that travelled in a `ray job submit` working dir lands in Ray's
    temporary copy of it, which Ray deletes: refuse before any work."""
    parts = Path(out.uri).parts
    if "runtime_resources" in parts or any(p.startswith("_ray_pkg_") for p in parts):
        raise SafeMergeError(
            f"output: {out.uri} is inside Ray's temporary copy of the job's working dir and would be deleted "
            "with it; give the output as an absolute path on a shared filesystem or as s3://"
        )


def _plan_jobs(pending: list[AdapterState], safety: str | None = None) -> list[ModuleJob]:
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


def _actor_shape(config: FleetConfig, n_jobs: int) -> tuple[int, float, int, str]:
    """(actors, gpus per actor, cpus per actor, device) from the config and the cluster's resources."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), resources.get("GPU", 0)
    gpus_per_actor = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if config.device == "cuda" and gpus_per_actor == 0:
        raise SafeMergeError("ray.device is cuda but the cluster has no GPUs (or gpus_per_actor is 0)")
    device = config.device if config.device != "auto" else ("cuda" if gpus_per_actor > 0 else "cpu")
    if config.actors is not None:
        actors = config.actors
    elif gpus_per_actor > 0:
        actors = max(1, int(gpus / gpus_per_actor))
    else:
        actors = max(1, cpus)
    actors = max(1, min(actors, n_jobs))
    if config.cpus_per_actor is not None:  # on an autoscaling cluster, what one worker pod offers
        cpus_per_actor = config.cpus_per_actor
    else:
        cpus_per_actor = max(1, cpus // actors) if gpus_per_actor == 0 else 1
    return actors, gpus_per_actor, cpus_per_actor, device


def _start_workers(config: FleetConfig, n_jobs: int, deadline: float | None) -> list:
    import ray

    n_actors, gpus_per_actor, cpus_per_actor, device = _actor_shape(config, n_jobs)
    _log(f"starting {n_actors} {device} worker(s)")
    # Restarts and retries are for lost processes and nodes; input errors come back as values.
    # A configured memory budget is reserved by Ray for each worker (and placement waits for it).
    memory = {"memory": config.memory_per_worker} if config.memory_per_worker else {}
    actor_cls = ray.remote(FleetWorker).options(
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, max_restarts=2, max_task_retries=2, **memory)
    return [actor_cls.remote(config.unaligned_model, config.aligned_model, config.s3, device, cpus_per_actor,
                             deadline)
            for _ in range(n_actors)]


def check_memory(config: FleetConfig, jobs: list[ModuleJob], results: list[PreflightResult]) -> list[ModuleJob]:
    """Before scoring: a worker's memory is the configured `ray.memory_per_worker`, or else the memory its
    node has left shared by the workers there. Every module must fit with one adapter at a time; the jobs
    come back with that budget, so that workers score adapters in chunks that stay under it."""
    if not jobs:
        return jobs
    worst = max(jobs, key=lambda j: j.cost.least)
    if config.memory_per_worker:
        have = config.memory_per_worker - PROCESS_BASELINE
        where = f"ray.memory_per_worker is {fmt(config.memory_per_worker)}"
    else:
        per_node: dict[str, list[PreflightResult]] = {}
        for r in results:
            per_node.setdefault(r.node_id, []).append(r)
        here = min(per_node.values(), key=lambda rs: min(r.memory_available for r in rs) / len(rs))
        free = min(r.memory_available for r in here)
        have, where = free // len(here), f"worker node {here[0].node} has {fmt(free)} free for {len(here)} worker(s)"
    check_fits(worst.cost, have, where)
    return [replace(job, budget=have) for job in jobs]


def _preflight(config: FleetConfig, out: Dir | None, workers: list,
               pending: list[AdapterState]) -> list[PreflightResult]:
    """Every worker checks, from its own node, every input it will read and the output it will write.

    Waits at most `ray.start_timeout_s` for the workers to be placed (an autoscaling cluster may need
    to add nodes first). Raises one line per problem, naming the node and the cause.
    """
    import ray

    marker = None
    if isinstance(out, LocalDir):
        marker = (f".preflight-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex)
        out.write(marker[0], marker[1].encode())
    uris = [st.ref.uri for st in pending]
    try:
        futures = [w.preflight.remote(uris, config.safety_adapter, out, marker) for w in workers]
        try:
            results = ray.get(futures, timeout=config.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise EnvironmentFailure(
                f"the {len(workers)} worker(s) did not start within {config.start_timeout_s:.0f} s: the cluster has "
                "no room for them (see `ray status`); raise ray.start_timeout_s if nodes are still being added"
            ) from None
        except ray.exceptions.RayActorError as exc:
            raise EnvironmentFailure(f"a worker died while starting: {first_line(exc)}") from None
        except ray.exceptions.RaySystemError as exc:
            raise EnvironmentFailure(f"Ray failed while starting the workers: {first_line(exc)}") from None
    finally:
        if marker and out is not None:
            (Path(out.uri) / marker[0]).unlink(missing_ok=True)
    problems = format_problems([p for r in results for p in r.problems])
    if problems:
        raise EnvironmentFailure("preflight: the workers cannot run this fleet:\n  " + "\n  ".join(problems))
    nodes = sorted({r.node for r in results})
    _log(f"preflight passed: {len(workers)} worker(s) on {len(nodes)} node(s): {', '.join(nodes)}")
    return results


class Deadline:
    """`max_run_seconds` from the run's start; `None` seconds: no deadline."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.at = time.time() + seconds if seconds else None  # wall clock: it travels to workers
        self.missed = 0  # adapters failed for it

    def passed(self) -> bool:
        return self.at is not None and time.time() >= self.at

    def wait_s(self, most: float) -> float:
        return most if self.at is None else max(0.0, min(most, self.at - time.time()))

    def warnings(self) -> list[str]:
        return [f"max_run_seconds ({self.seconds:g} s) reached: {self.missed} adapter(s) not finished; their "
                "previous pointers stay"] if self.missed else []

    def failure(self, what: str) -> Failure:
        self.missed += 1
        return Failure(f"not {what} within max_run_seconds ({self.seconds:g} s); its previous pointer stays", True)


def _worker_lost(exc: BaseException, doing: str, cost: ModuleCost | None = None) -> str:
    """One line for a worker whose restarts are spent; a kill for memory is named as such."""
    import ray

    need = f" (it needs about {fmt(cost.peak)} beyond the process)" if cost else ""
    text = str(exc)
    if isinstance(exc, ray.exceptions.RayTaskError) and not isinstance(exc, ray.exceptions.RayActorError):
        return f"{doing} failed: {first_line(exc)}"  # not a lost worker: an error inside the task
    if isinstance(exc, ray.exceptions.OutOfMemoryError) or "low on memory" in text or "OutOfMemoryError" in text:
        return (f"a worker was killed for running out of memory while {doing}{need}; give workers more memory "
                "(ray.memory_per_worker, larger nodes)")
    return (f"a worker died while {doing} and could not be restarted{need}; if its node killed it for memory "
            f"(OOM), give workers more memory: {first_line(exc)}")


# A task whose worker was lost goes to the next worker at once, then again after Ray has had time to
# notice a dead node (its health checks take some seconds) and restart the worker elsewhere. Ray's own
# task retries are not enough there: they are spent in milliseconds against an unreachable worker.
RESUBMIT_WAITS_S = (0.0, 10.0, 30.0)


def _gather(items: list, submit, deadline: Deadline):
    """Run `submit(item, attempt) -> ObjectRef` for every item and yield (item, result, None) as results
    come, resubmitting a lost worker's task per RESUBMIT_WAITS_S; yields (item, None, error) when it stays
    lost, and (item, None, None) for what is unfinished at the deadline."""
    import ray

    lost_worker = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                   ray.exceptions.ObjectLostError)
    running = {submit(item, 0): (item, 0) for item in items}
    waiting: list[tuple[float, object, int]] = []  # (when, item, attempt): resubmissions not yet due
    told: set[str] = set()
    while running or waiting:
        now = time.monotonic()
        for entry in [w for w in waiting if w[0] <= now]:
            waiting.remove(entry)
            running[submit(entry[1], entry[2])] = (entry[1], entry[2])
        if deadline.passed():
            for item in [i for i, _ in running.values()] + [w[1] for w in waiting]:
                yield item, None, None
            return
        if not running:
            time.sleep(min(0.5, deadline.wait_s(0.5)))
            continue
        done, _ = ray.wait(list(running), num_returns=1, timeout=deadline.wait_s(2.0))
        for ref in done:
            item, attempt = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:
                if isinstance(exc, lost_worker) and attempt < len(RESUBMIT_WAITS_S):
                    if first_line(exc) not in told:  # once per lost worker, not once per task
                        told.add(first_line(exc))
                        _log(f"a worker was lost ({first_line(exc)[:160]}); resubmitting its tasks to others")
                    waiting.append((time.monotonic() + RESUBMIT_WAITS_S[attempt], item, attempt + 1))
                    continue
                yield item, None, exc
                continue
            yield item, result, None


def score_tasks(jobs: list[ModuleJob]) -> list[ScoreTask]:
    """Jobs in the order of their tensors in an adapter file (by name: `layers.1`, `layers.10`, ...), so that
    a task's factors are one stretch of each file; neighbours join one task while its weights and factors
    stay under TASK_BYTES (a large module is a task of its own)."""
    tasks: list[ScoreTask] = []
    current: list[ModuleJob] = []
    size = 0
    for job in sorted(jobs, key=lambda j: j.module):
        cost = job.nbytes + job.factor_bytes
        if current and size + cost > TASK_BYTES:
            tasks.append(ScoreTask(tuple(current)))
            current, size = [], 0
        current.append(job)
        size += cost
    return tasks + ([ScoreTask(tuple(current))] if current else [])


def _score(workers: list, jobs: list[ModuleJob], pending: list[AdapterState], progress: bool,
           deadline: Deadline) -> None:
    """Score every pending adapter, module-major; past the deadline, what is unscored fails."""
    _log(f"scoring {len(jobs)} modules ({sum(j.nbytes for j in jobs) / 1e6:.0f} MB of model weights) "
         f"for {len(pending)} adapters")
    tasks = score_tasks(jobs)
    placed = {}  # task -> (worker index, the task after it on that worker: read ahead while it is scored)
    for w, shard in enumerate(balance(tasks, len(workers))):
        for i, task in enumerate(shard):
            placed[task.name] = (w, shard[i + 1] if i + 1 < len(shard) else None)

    def submit(task: ScoreTask, attempt: int):
        w, next_task = placed[task.name]
        return workers[(w + attempt) % len(workers)].score.remote(task, next_task if attempt == 0 else None)

    bar = Progress("score", len(jobs)) if progress else None
    by_name = {st.ref.name: st for st in pending}
    batches = 0
    for task, results, error in _gather(tasks, submit, deadline):
        if error is not None:  # its worker stayed lost
            worst = max(task.jobs, key=lambda j: j.cost.peak)
            raise EnvironmentFailure(_worker_lost(error, f"scoring module {worst.module}", worst.cost))
        if results is None:  # the deadline
            for job in task.jobs:
                for req in job.requests:
                    if by_name[req.adapter].status == "pending":
                        by_name[req.adapter].fail(deadline.failure("scored"))
            continue
        for result in results:
            batches += result.batches
            for name, score in result.scores.items():
                by_name[name].scores[result.module] = score
            for name, ref in result.projected.items():
                by_name[name].projected[result.module] = ref
            for name, failure in result.errors.items():
                if by_name[name].status == "pending":
                    by_name[name].fail(failure)
            if bar:
                bar.advance(nbytes=result.nbytes)
    if batches > len(jobs):
        _log(f"{batches} scoring batches for {len(jobs)} modules: adapters grouped by rank and chunked to stay "
             f"within each worker's batch cap and memory budget ({fmt(jobs[0].budget or 0)} for tensors)",
             batches=batches)


def _assemble(config: FleetConfig, workers: list, out: Dir, run_id: str, pending: list[AdapterState],
              progress: bool, deadline: Deadline) -> None:
    """One assembly task per adapter, spread over the workers; past the deadline, what is unwritten fails.
    Only scalars and references travel: each worker plans the adapter again from the headers it holds, and
    fetches SafeLoRA's projected Bs from Ray's object store itself."""
    index = {st.ref.name: i for i, st in enumerate(pending)}

    def submit(st: AdapterState, attempt: int):
        worker = workers[(index[st.ref.name] + attempt) % len(workers)]
        return worker.assemble.remote(st.ref.name, st.ref.uri, st.fingerprint, config.safety_adapter, st.scores,
                                      st.projected, st.settings, out, adapter_prefix(run_id, st.ref.name))

    bar = Progress("assemble", len(pending), unit="adapters written") if progress else None
    for st, result, error in _gather(pending, submit, deadline):
        if error is not None:
            st.fail(Failure(_worker_lost(error, f"assembling {st.ref.name}"), True))
        elif result is None:
            st.fail(deadline.failure("written"))
        elif result.error is not None:
            st.fail(result.error)
        else:
            st.status, st.objects, st.decisions, st.counts = "assembled", result.objects, result.decisions, \
                result.counts
        st.scores, st.projected = {}, {}  # done with: the projected Bs leave the object store
        if bar:
            bar.advance()


def _gate(config: FleetConfig, out: Dir, run_id: str, states: list[AdapterState], deadline: Deadline):
    """Evaluate the run's repaired adapters (where they are written, not yet published); hold back every
    one that fails the gate. Returns the evaluation (None if it failed or never started: then every
    adapter is held)."""
    from .gate import run_gate

    assert config.gate is not None
    assembled = [st for st in states if st.status == "assembled"]
    if not assembled:
        return None
    if deadline.passed():  # nothing unchecked is published, and no evaluation starts past the deadline
        for st in assembled:
            st.status, st.reason = "held", "gate: not evaluated: the run's deadline (max_run_seconds) passed"
        return None
    _log(f"gate: evaluating {len(assembled)} repaired adapters")
    pairs = [Pair(st.ref.name, st.ref.uri, f"{out.uri.rstrip('/')}/{adapter_prefix(run_id, st.ref.name)}")
             for st in assembled]
    outcome = run_gate(config.gate, config.aligned_model, pairs, config.s3)
    for st in assembled:
        st.gate = outcome.numbers.get(st.ref.name)
        if st.ref.name in outcome.held:
            st.status, st.reason = "held", outcome.held[st.ref.name]
    _log(f"gate: {len(assembled) - len(outcome.held)} passed, {len(outcome.held)} held back")
    return outcome.result


def _commit(config: FleetConfig, out: Dir, run_id: str, states: list[AdapterState], fingerprints: dict,
            report: FleetReport, evaluation=None) -> None:
    """The run's decisions, evaluation and summary, then the output store's commit (manifest, then pointers).
    Adapters held back by the gate are listed with why, and their pointers stay."""
    assembled = [st for st in states if st.status == "assembled"]
    written = [st for st in states if st.status in ("assembled", "held")]
    summary = {
        "tool": "safemerge-ray", "version": __version__, "run_id": run_id, "created_at": utc_now(),
        "adapters": {st.ref.name: _adapter_summary(st) for st in states},
        "warnings": report.warnings,
    }
    inputs = {role: {"uri": uri, "fingerprint": fingerprints[role]} for role, uri in (
        ("unaligned_model", config.unaligned_model), ("aligned_model", config.aligned_model),
        ("safety_adapter", config.safety_adapter))}
    decisions = pa.concat_tables([st.decisions for st in written if st.decisions is not None])
    commit_run(out, run_id, inputs,
               [Published(st.ref.name, st.ref.uri, st.fingerprint, st.run_key, st.settings.to_dict(), st.objects,
                          st.why) for st in assembled],
               {DECISIONS: decisions_bytes(decisions), **(evaluation.files() if evaluation else {}),
                SUMMARY: json_bytes(summary)},
               {st.ref.name: st.reason for st in states if st.status == "failed"},
               held={st.ref.name: st.reason for st in states if st.status == "held"})
    for st in assembled:
        st.status = "committed"


def _adapter_summary(st: AdapterState) -> dict:
    entry: dict[str, object] = {"status": "committed" if st.status == "assembled" else st.status, "uri": st.ref.uri}
    if st.reason:
        entry["reason"] = st.reason
    if st.counts:
        entry["counts"] = st.counts
    if st.status == "unchanged":
        entry["run_id"] = st.previous_run
    if st.why:
        entry["why"] = st.why
    if st.gate:
        entry["gate"] = st.gate
    return entry


def format_report(report: FleetReport) -> str:
    lines = [f"{'adapter':<20} {'status':<10} {'repaired':>9}  detail"]
    shown, left_out = report.listed()
    for st in shown:
        repaired = f"{st.counts['repaired']}/{st.counts['modules']}" if st.counts else "-"
        detail = st.reason if st.status in ("failed", "held") else (f"run {st.previous_run}" if st.status == "unchanged"
                                                          else "; ".join(st.why))
        lines.append(f"{st.ref.name:<20} {st.status:<10} {repaired:>9}  {detail}")
    if left_out:
        where = f"{run_prefix(report.run_id)}summary.json" if report.run_id else "status/last_run.json (the first 100)"
        lines.append(f"... and {left_out} more failed adapters: see {where}")
    for w in report.warnings[:MAX_FAILED_LINES]:
        lines.append(f"warning: {w}")
    if len(report.warnings) > MAX_FAILED_LINES:
        lines.append(f"... and {len(report.warnings) - MAX_FAILED_LINES} more warnings")
    if report.run_id:
        lines.append(f"run {report.run_id}: {report.output.rstrip('/')}/{run_prefix(report.run_id)} "
                     f"({report.bytes_read / 1e6:.0f} MB read)")
    elif report.by_status("failed"):
        lines.append(f"nothing committed: {len(report.by_status('unchanged'))} unchanged, "
                     f"{len(report.by_status('failed'))} failed (their previous pointers stay) in {report.output}")
    else:
        lines.append(f"nothing to do: every adapter is up to date in {report.output}")
    return "\n".join(lines)


def init_ray(address: str | None = None, runtime_env: dict | None = None, quiet: bool = False) -> None:
    """Join the cluster named by `address` / RAY_ADDRESS / a local `ray start`, or start a local one.
    `quiet`: Ray's own INFO lines and the workers' output stay out of this process's output."""
    import logging

    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address, runtime_env=runtime_env, ignore_reinit_error=True,
                     logging_level=logging.WARNING if quiet else logging.INFO, log_to_driver=not quiet)
        except (ConnectionError, ray.exceptions.RayError, RuntimeError) as exc:  # unreachable, bad token, ...
            raise EnvironmentFailure(f"cannot start or join Ray (address {address or 'auto'}): "
                                     f"{first_line(exc)}") from None
        if threading.current_thread() is threading.main_thread():
            # Ray's own handler aborts the process; SIGTERM (`ray job stop`, an evicted pod) should end a
            # run as Ctrl-C does, with its run record written.
            signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
