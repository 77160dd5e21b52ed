"""The fleet's worker: a Ray actor that checks its node (preflight), scores modules (module-major), then
assembles adapters (adapter-major), keeping the headers it read where the work happens."""

from __future__ import annotations

import gc
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..core import MergeSettings, available_memory
from ..engine import (
    ModulePlan,
    ModuleScore,
    RepairInputs,
    SafetyProjection,
    assemble_adapter,
    delta_from_pair,
    plan_adapter,
    read_weight_pair,
    resolve_device,
    score_module,
)
from ..errors import EnvironmentFailure, NoCredentials, SafeMergeError
from ..io import (
    BYTES_READ,
    Checkpoint,
    Dir,
    FactorRows,
    LoraAdapter,
    S3Settings,
    json_bytes,
    load_adapter,
    open_dir,
    read_factor_rows,
    release_freed_buffers,
)
from ..store import counts, decisions_table, utc_now, write_verified
from .jobs import AssemblyResult, Failure, ModuleJob, ModuleResult, PreflightResult, Problem, ScoreRequest, ScoreTask

if TYPE_CHECKING:
    from ray import ObjectRef

# Every assembly reads the safety adapter's repaired layers: a worker keeps it in memory up to this size.
SAFETY_IN_MEMORY = 512 * 2**20

# A module's weights are read again after botocore's own retries have given up (a longer outage),
# before the adapters that need them fail: waits of 5, 15, 45 s, never past the run's deadline.
READ_RETRY_WAITS_S = (5.0, 15.0, 45.0)


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
            result.stash_carried()
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
        projection = SafetyProjection()  # the module's chunks share it
        for rank in sorted(by_rank):
            group = by_rank[rank]
            size = job.cost.chunk(rank, job.budget)
            for start in range(0, len(group), size):
                ready, a_all, b_all = self._stacked(job.module, group[start:start + size], rows, result)
                if ready:
                    repairs = [RepairInputs(self._adapter(req.uri).modules[job.module].scaling, safety_lora,
                                            safety_scaling, projection) for req in ready]
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
                 carried: dict[str, ObjectRef], settings: MergeSettings, out: Dir, prefix: str) -> AssemblyResult:
        """Decide, merge and write one adapter under `prefix` (staged until the commit). Its plan is made again
        here, from the headers this worker holds (the adapter's must be the one the driver planned)."""
        try:
            if carried:
                import ray

                fetched = ray.get(list(carried.values()))
                scores = {**scores, **{m: scores[m]._replace(projected_b=b, repaired=r)
                                       for m, (b, r) in zip(carried, fetched, strict=True)}}
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
