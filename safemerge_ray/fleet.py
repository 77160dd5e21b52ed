"""The fleet job: one Ray run repairs every fine-tune against one shared safety adapter.

    plan    (driver, safetensors headers only)
 -> score   (worker actors, module-major: each module's two weights are read once, by one worker, and
             every pending adapter is scored against them in one batch; only scores travel back)
 -> decide + assemble (one task per adapter on the same workers, adapter-major; it writes its adapter)
 -> commit  (the run's decisions and summary, then `manifest.json` last, then per-adapter pointers)

A run without its manifest did not happen; consumers follow `latest/<adapter>.json`, which moves only
after the manifest is written. Workers fail and retry under Ray's own mechanisms (actor restarts,
actor task retries). An adapter whose inputs are bad fails alone, with its reason in the run summary.
"""

from __future__ import annotations

import datetime as _dt
import json
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from . import __version__
from .adapters import LoraAdapter, load_adapter
from .assemble import ModuleScore, assemble_adapter
from .config import AdapterRef, FleetConfig
from .errors import SafeMergeError
from .merge import MergeSettings
from .output import DECISIONS, SUMMARY, adapter_files, json_bytes
from .plan import ModulePlan, plan_adapter
from .progress import Progress
from .repair import delta_from_pair, read_weight_pair, resolve_device, score_module
from .report import counts, decisions_bytes
from .storage import BYTES_READ, Dir, S3Settings, open_dir, sha256_of
from .tensors import Checkpoint, natural_key, release_freed_buffers

EXIT_OK, EXIT_CONFIG, EXIT_PARTIAL, EXIT_FAILED = 0, 2, 3, 4
MANIFEST = "manifest.json"


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


@dataclass
class ModuleResult:
    module: str
    nbytes: int
    bytes_read: int = 0  # measured in the actor: this call's reads (and the prefetch it waited for)
    scores: dict[str, ModuleScore] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


class FleetWorker:
    """A Ray actor: scores modules (module-major), then assembles adapters (adapter-major).

    It keeps both checkpoints' headers (and adapters' headers) where the scoring happens. While one
    module is scored, the next one's weights are already being read (one background thread: file and
    network reads and torch's GEMMs both release the GIL), so I/O hides under compute. Assembly runs
    on the same warm processes, so a run pays for one set of worker start-ups, not two.
    """

    def __init__(self, unaligned: str, aligned: str, s3: S3Settings, device: str, threads: int | None = None):
        release_freed_buffers()
        if threads:
            torch.set_num_threads(threads)
        self.s3, self.device = s3, resolve_device(device)
        self.unaligned = Checkpoint(open_dir(unaligned, what="unaligned model", s3=s3), "unaligned model")
        self.aligned = Checkpoint(open_dir(aligned, what="aligned model", s3=s3), "aligned model")
        self.adapters: dict[str, LoraAdapter] = {}
        self._reader = ThreadPoolExecutor(max_workers=1)
        self._prefetched: dict[str, Future] = {}

    def _adapter(self, uri: str) -> LoraAdapter:
        if uri not in self.adapters:
            self.adapters[uri] = load_adapter(open_dir(uri, what=f"adapter {uri}", s3=self.s3), uri)
        return self.adapters[uri]

    def _read(self, job: ModuleJob) -> Future:
        return self._reader.submit(read_weight_pair, job.weight_key, self.unaligned, self.aligned, self.device)

    def score(self, job: ModuleJob, next_job: ModuleJob | None = None) -> ModuleResult:
        before = BYTES_READ.total
        result = self._score(job, next_job)
        result.bytes_read = BYTES_READ.total - before
        return result

    def _score(self, job: ModuleJob, next_job: ModuleJob | None) -> ModuleResult:
        pending_read = self._prefetched.pop(job.module, None) or self._read(job)
        if next_job is not None and next_job.module not in self._prefetched:
            self._prefetched[next_job.module] = self._read(next_job)
        result = ModuleResult(job.module, job.nbytes)
        plan = ModulePlan(job.module, job.weight_key, job.transpose, job.nbytes, None, None)
        try:
            v = delta_from_pair(plan, pending_read.result(), self.device)
        except SafeMergeError as exc:  # a bad model weight fails every adapter that needs it
            result.errors = {r.adapter: str(exc) for r in job.requests}
            return result
        ready, loras = [], []
        for req in job.requests:
            try:
                loras.append(self._adapter(req.uri).read_lora(job.module))
                ready.append(req)
            except SafeMergeError as exc:
                result.errors[req.adapter] = str(exc)
        if ready:
            scores = score_module(job.module, v, loras, [r.settings for r in ready])
            result.scores = {req.adapter: s for req, s in zip(ready, scores)}
        return result

    def assemble(self, *args) -> dict:
        return assemble_and_write(*args)


def assemble_and_write(name: str, uri: str, safety_uri: str | None, plans: list[ModulePlan],
                       scores: dict[str, ModuleScore], settings: MergeSettings, out: Dir, prefix: str,
                       s3: S3Settings) -> dict:
    """Decide, merge and write one adapter under `prefix`; returns its objects' digests and decisions."""
    before = BYTES_READ.total
    try:
        finetuned = load_adapter(open_dir(uri, what=f"adapter {name}", s3=s3), f"adapter {name}")
        safety = (load_adapter(open_dir(safety_uri, what="safety adapter", s3=s3), "safety adapter")
                  if safety_uri else None)
        result = assemble_adapter(name, plans, scores, finetuned, safety, settings)
    except SafeMergeError as exc:
        return {"adapter": name, "error": str(exc), "bytes_read": BYTES_READ.total - before}
    objects = {}
    for fname, data in adapter_files(result.tensors, result.config).items():
        out.write(f"{prefix}{fname}", data)
        objects[f"{prefix}{fname}"] = {"sha256": sha256_of(data), "bytes": len(data)}
    return {"adapter": name, "objects": objects, "decisions": result.decisions,
            "bytes_read": BYTES_READ.total - before}


@dataclass
class AdapterState:
    ref: AdapterRef
    settings: MergeSettings | None = None
    fingerprint: str = ""
    run_key: str = ""
    plans: list[ModulePlan] = field(default_factory=list)
    status: str = "pending"  # pending | unchanged | committed | failed
    reason: str = ""
    previous_run: str | None = None
    scores: dict[str, ModuleScore] = field(default_factory=dict)
    objects: dict = field(default_factory=dict)  # written object -> {sha256, bytes}
    decisions: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)


@dataclass
class FleetReport:
    run_id: str | None
    output: str
    adapters: list[AdapterState]
    exit_code: int
    warnings: list[str] = field(default_factory=list)
    bytes_read: int = 0  # by the driver, the scoring actors and the assembly tasks, measured in each

    def by_status(self, status: str) -> list[str]:
        return [a.ref.name for a in self.adapters if a.status == status]


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def run_key(fingerprints: dict, adapter_fp: str, settings: MergeSettings) -> str:
    """What an adapter's output depends on; an equal key means the committed output is still right."""
    return sha256_of(json.dumps({"tool": __version__, "inputs": fingerprints, "adapter": adapter_fp,
                                 "settings": settings.to_dict()}, sort_keys=True).encode())


def balance(jobs: list[ModuleJob], n: int) -> list[list[ModuleJob]]:
    """Split jobs into n shards of about equal bytes (largest first onto the lightest shard)."""
    shards: list[list[ModuleJob]] = [[] for _ in range(n)]
    loads = [0] * n
    for job in sorted(jobs, key=lambda j: (-j.nbytes, natural_key(j.module))):
        i = loads.index(min(loads))
        shards[i].append(job)
        loads[i] += job.nbytes
    return [sorted(s, key=lambda j: natural_key(j.module)) for s in shards if s]


def _read_pointer(out: Dir, name: str) -> dict | None:
    key = f"latest/{name}.json"
    if not out.exists(key):
        return None
    try:
        return json.loads(out.read(key))
    except ValueError:
        return None  # a damaged pointer only means the adapter is redone


def _log(msg: str) -> None:
    print(f"[fleet] {msg}", flush=True)


def run_fleet(config: FleetConfig, progress: bool = True, run_id: str | None = None,
              ray_address: str | None = None) -> FleetReport:
    """Plan, score, assemble and commit; Ray is started or joined only when there is work."""
    driver_before = BYTES_READ.total
    s3 = config.s3
    out = open_dir(config.output, what="output", s3=s3, must_exist=False)
    refs = config.resolve_adapters()
    if not refs:
        raise SafeMergeError(f"{config.source}: finetuned: no adapters found")
    unaligned = Checkpoint(open_dir(config.unaligned_model, what="unaligned model", s3=s3), "unaligned model")
    aligned = Checkpoint(open_dir(config.aligned_model, what="aligned model", s3=s3), "aligned model")
    safety = (load_adapter(open_dir(config.safety_adapter, what="safety adapter", s3=s3), "safety adapter")
              if config.safety_adapter else None)
    fingerprints = {"unaligned_model": unaligned.fingerprint(), "aligned_model": aligned.fingerprint(),
                    "safety_adapter": safety.fingerprint if safety else None}
    warnings = [f"overrides.{n}: no adapter of that name in this fleet"
                for n in config.overrides if n not in {r.name for r in refs}]

    states = [AdapterState(ref) for ref in refs]
    for st in states:
        try:
            adapter = load_adapter(open_dir(st.ref.uri, what=f"adapter {st.ref.name}", s3=s3), f"adapter {st.ref.name}")
            st.settings = config.settings_for(st.ref.name)
            st.fingerprint = adapter.fingerprint
            st.run_key = run_key(fingerprints, adapter.fingerprint, st.settings)
            pointer = _read_pointer(out, st.ref.name)
            st.previous_run = pointer.get("run_id") if pointer else None
            if pointer and pointer.get("run_key") == st.run_key:
                st.status = "unchanged"
                continue
            st.plans = plan_adapter(unaligned, aligned, adapter, safety)
        except SafeMergeError as exc:
            st.status, st.reason = "failed", str(exc)
    pending = [st for st in states if st.status == "pending"]
    failed_early = [st for st in states if st.status == "failed"]
    _log(f"{len(refs)} adapters: {len(pending)} to repair, "
         f"{sum(st.status == 'unchanged' for st in states)} unchanged, {len(failed_early)} invalid")
    if not pending and not failed_early:
        return FleetReport(None, out.uri, states, EXIT_OK, warnings, BYTES_READ.total - driver_before)

    run_id = run_id or new_run_id()
    worker_bytes = 0
    if pending:
        init_ray(ray_address)
        jobs = _plan_jobs(pending)
        workers = _start_workers(config, len(jobs))
        try:
            worker_bytes += _score(workers, jobs, pending, progress)
            worker_bytes += _assemble(config, workers, out, run_id, [st for st in pending if st.status == "pending"],
                                      progress)
        finally:
            import ray

            for worker in workers:
                ray.kill(worker)
    report = FleetReport(run_id, out.uri, states, EXIT_OK, warnings)
    _commit(config, out, run_id, states, fingerprints, report)
    report.bytes_read = BYTES_READ.total - driver_before + worker_bytes
    committed, failed = report.by_status("committed"), report.by_status("failed")
    report.exit_code = EXIT_OK if not failed else EXIT_PARTIAL if committed else EXIT_FAILED
    return report


def _plan_jobs(pending: list[AdapterState]) -> list[ModuleJob]:
    """One job per target module, naming every pending adapter that needs it."""
    by_module: dict[str, list[tuple[ModulePlan, ScoreRequest]]] = {}
    for st in pending:
        for plan in st.plans:
            by_module.setdefault(plan.module, []).append((plan, ScoreRequest(st.ref.name, st.ref.uri, st.settings)))
    jobs = []
    for module, items in by_module.items():
        first = items[0][0]
        jobs.append(ModuleJob(module, first.weight_key, first.transpose, first.nbytes,
                              tuple(req for _, req in items)))
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
    cpus_per_actor = max(1, cpus // actors) if gpus_per_actor == 0 else 1
    return actors, gpus_per_actor, cpus_per_actor, device


def _start_workers(config: FleetConfig, n_jobs: int) -> list:
    import ray

    n_actors, gpus_per_actor, cpus_per_actor, device = _actor_shape(config, n_jobs)
    _log(f"starting {n_actors} {device} worker(s)")
    actor_cls = ray.remote(FleetWorker).options(
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, max_restarts=2, max_task_retries=2)
    return [actor_cls.remote(config.unaligned_model, config.aligned_model, config.s3, device, cpus_per_actor)
            for _ in range(n_actors)]


def _score(workers: list, jobs: list[ModuleJob], pending: list[AdapterState], progress: bool) -> int:
    """Score every pending adapter, module-major; returns the bytes the workers read."""
    import ray

    _log(f"scoring {len(jobs)} modules ({sum(j.nbytes for j in jobs) / 1e6:.0f} MB of model weights) "
         f"for {len(pending)} adapters")
    futures = [worker.score.remote(job, shard[i + 1] if i + 1 < len(shard) else None)
               for worker, shard in zip(workers, balance(jobs, len(workers))) for i, job in enumerate(shard)]
    bar = Progress("score", len(jobs)) if progress else None
    by_name = {st.ref.name: st for st in pending}
    bytes_read = 0
    try:
        remaining = futures
        while remaining:
            done, remaining = ray.wait(remaining, num_returns=1, timeout=5.0)
            for result in ray.get(done):
                bytes_read += result.bytes_read
                for name, score in result.scores.items():
                    by_name[name].scores[result.module] = score
                for name, reason in result.errors.items():
                    st = by_name[name]
                    if st.status == "pending":
                        st.status, st.reason = "failed", reason
                if bar:
                    bar.advance(nbytes=result.nbytes)
    except ray.exceptions.RayActorError as exc:  # restarts exhausted: a worker keeps dying
        raise SafeMergeError(f"scoring failed: a worker died and could not be restarted ({exc})") from None
    return bytes_read

def _assemble(config: FleetConfig, workers: list, out: Dir, run_id: str, pending: list[AdapterState],
              progress: bool) -> int:
    """One assembly task per adapter, spread over the workers; returns the bytes they read."""
    import ray

    bytes_read = 0
    futures = {
        workers[i % len(workers)].assemble.remote(
            st.ref.name, st.ref.uri, config.safety_adapter, st.plans, st.scores, st.settings, out,
            f"runs/{run_id}/{st.ref.name}/", config.s3): st
        for i, st in enumerate(pending)
    }
    bar = Progress("assemble", len(futures), unit="adapters written") if progress else None
    remaining = list(futures)
    while remaining:
        done, remaining = ray.wait(remaining, num_returns=1, timeout=5.0)
        for ref in done:
            st = futures[ref]
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:  # retries exhausted
                result = {"error": f"assembly failed: {exc}"}
            bytes_read += result.get("bytes_read", 0)
            if "error" in result:
                st.status, st.reason = "failed", result["error"]
            else:
                st.status, st.objects, st.decisions = "assembled", result["objects"], result["decisions"]
                st.counts = counts(result["decisions"])
            if bar:
                bar.advance()
    return bytes_read


def _commit(config: FleetConfig, out: Dir, run_id: str, states: list[AdapterState], fingerprints: dict,
            report: FleetReport) -> None:
    """Run-level files, then the manifest (the commit point), then the pointers."""
    prefix = f"runs/{run_id}/"
    assembled = [st for st in states if st.status == "assembled"]
    rows = [row for st in assembled for row in st.decisions]
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    summary = {
        "tool": "safemerge-ray", "version": __version__, "run_id": run_id, "created_at": now,
        "adapters": {st.ref.name: _adapter_summary(st) for st in states},
        "warnings": report.warnings,
    }
    run_files = {f"{prefix}{DECISIONS}": decisions_bytes(rows), f"{prefix}{SUMMARY}": json_bytes(summary)}
    for key, data in run_files.items():
        out.write(key, data)
    manifest = {
        "tool": "safemerge-ray", "version": __version__, "run_id": run_id, "committed_at": now,
        "inputs": {
            "unaligned_model": {"uri": config.unaligned_model, "fingerprint": fingerprints["unaligned_model"]},
            "aligned_model": {"uri": config.aligned_model, "fingerprint": fingerprints["aligned_model"]},
            "safety_adapter": {"uri": config.safety_adapter, "fingerprint": fingerprints["safety_adapter"]},
        },
        "adapters": {st.ref.name: {"uri": st.ref.uri, "fingerprint": st.fingerprint, "run_key": st.run_key,
                                   "settings": st.settings.to_dict(), "objects": st.objects} for st in assembled},
        "objects": {k: {"sha256": sha256_of(v), "bytes": len(v)} for k, v in run_files.items()},
        "failed": {st.ref.name: st.reason for st in states if st.status == "failed"},
    }
    out.write(f"{prefix}{MANIFEST}", json_bytes(manifest))
    for st in assembled:
        pointer = {"adapter": st.ref.name, "run_id": run_id, "path": f"{prefix}{st.ref.name}/",
                   "manifest": f"{prefix}{MANIFEST}", "run_key": st.run_key, "committed_at": now}
        out.write(f"latest/{st.ref.name}.json", json_bytes(pointer))
        st.status = "committed"


def _adapter_summary(st: AdapterState) -> dict:
    entry = {"status": "committed" if st.status == "assembled" else st.status, "uri": st.ref.uri}
    if st.reason:
        entry["reason"] = st.reason
    if st.counts:
        entry["counts"] = st.counts
    if st.status == "unchanged":
        entry["run_id"] = st.previous_run
    return entry


def format_report(report: FleetReport) -> str:
    lines = [f"{'adapter':<20} {'status':<10} {'repaired':>9}  detail"]
    for st in report.adapters:
        repaired = f"{st.counts['repaired']}/{st.counts['modules']}" if st.counts else "-"
        detail = st.reason if st.status == "failed" else (f"run {st.previous_run}" if st.status == "unchanged" else "")
        lines.append(f"{st.ref.name:<20} {st.status:<10} {repaired:>9}  {detail}")
    for w in report.warnings:
        lines.append(f"warning: {w}")
    if report.run_id:
        lines.append(f"run {report.run_id}: {report.output.rstrip('/')}/runs/{report.run_id}/ "
                     f"({report.bytes_read / 1e6:.0f} MB read)")
    else:
        lines.append(f"nothing to do: every adapter is up to date in {report.output}")
    return "\n".join(lines)


def init_ray(address: str | None = None) -> None:
    """Join the cluster named by `address` / RAY_ADDRESS / a local `ray start`, or start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True)
