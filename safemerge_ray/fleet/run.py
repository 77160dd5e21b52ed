"""The fleet job: one Ray run repairs every fine-tune against one shared safety adapter.

    plan    (driver, safetensors headers only: `plan.py`)
 -> score   (worker actors, module-major: each module's two weights are read once, by one worker, and
             every pending adapter is scored against them in one batch; only scores travel back)
 -> decide + assemble (one task per adapter on the same workers, adapter-major; it writes its adapter)
 -> gate    (optional: an evaluation of the repaired adapters; those that fail are held back)
 -> commit  (the run's decisions and summary, then `manifest.json` last, then per-adapter pointers)

A run without its manifest did not happen; consumers follow `latest/<adapter>.json`, which moves only
after the manifest is written. Before any scoring, every worker checks that it can read every input
and write the output from its own node (preflight, `pool.py`). Lost processes and nodes are retried by Ray
(actor restarts, actor task retries); errors in inputs never are: workers return them as values. An
adapter whose inputs are bad fails alone, with its reason in the run summary. Every run, even one with
nothing to do or one stopped by an error, leaves a run record (`status/last_run.json`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import replace
from functools import partial

import pyarrow as pa

from .. import __version__
from ..cluster import init_ray
from ..core import PolicyName, fmt
from ..errors import EnvironmentFailure, ExitStatus, SafeMergeError, TimedOut, call_within, first_line
from ..io import BYTES_READ, Dir, json_bytes, open_dir, read_json
from ..loop import EvalResult, Pair, read_prompt_sets, run_gate
from ..progress import LOG, Progress, log
from ..store import (
    DECISIONS,
    SUMMARY,
    VERIFIED,
    LockHeld,
    Published,
    RunLock,
    RunRecord,
    adapter_prefix,
    commit_run,
    decisions_bytes,
    new_run_id,
    utc_now,
    write_run_record,
)
from .config import FleetConfig
from .jobs import Deadline, Failure, ModuleJob, ScoreTask, balance, score_tasks
from .plan import AdapterState, AdapterStatus, FleetPlan, pin_safety_adapter, plan_fleet, plan_jobs
from .pool import check_memory, gather, preflight, start_workers, worker_lost
from .report import FleetReport, Phase, PhaseClock, exit_status
from .reporting import report_fleet_run

_log = partial(log, "fleet")


def run_fleet(config: FleetConfig, progress: bool = True, run_id: str | None = None,
              ray_address: str | None = None, runtime_env: dict | None = None,
              break_lock: bool = False) -> FleetReport:
    """Plan, score, assemble and commit; Ray is started or joined only when there is work.

    One run per output at a time (its lock; another run's lock is LockHeld, exit status 5). Whatever
    happens once the lock is held, a run record is written (`status/last_run.json`) and attached to
    the report, or to the error as `run_record`.
    """
    LOG.run_id = None  # set once this run has an id
    deadline = Deadline(config.max_run_seconds)
    out = open_dir(config.output, what="output", s3=config.s3, must_exist=False)
    record = RunRecord(started_at=utc_now(), output=out.uri, config=config.source)
    clock = PhaseClock(record.phase_s)  # a run stopped by an error still records the phases it went through
    try:
        lock = RunLock(out).acquire(break_lock=break_lock)
    except LockHeld as exc:  # another run's output: its record is not ours to write, but the night is reported
        record.exit_status, record.error = exc.exit_code, str(exc)
        report_fleet_run(config, None, record)
        for warning in record.warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        raise
    try:
        return _run_locked(config, out, record, lock, deadline, progress, run_id, ray_address, runtime_env, clock)
    finally:
        try:
            call_within(lock.release, deadline.cleanup_s(), "releasing the run lock past max_run_seconds")
        except EnvironmentFailure as exc:
            print(f"warning: {exc}; the lock expires by itself within {lock.lease_s:.0f} s", file=sys.stderr,
                  flush=True)


def _run_locked(config: FleetConfig, out: Dir, record: RunRecord, lock: RunLock, deadline: Deadline,
                progress: bool, run_id: str | None, ray_address: str | None, runtime_env: dict | None,
                clock: PhaseClock) -> FleetReport:
    try:
        report = _run(config, out, progress, run_id, ray_address, runtime_env, lock, record, deadline, clock)
    except SafeMergeError as exc:
        record.exit_status, record.error = exc.exit_code, str(exc)
        _save_record(config, out, record, deadline)
        exc.run_record = record
        raise
    except KeyboardInterrupt:  # also SIGTERM (`ray job stop`, a pod evicted): the CLI turns it into this
        record.exit_status = ExitStatus.INTERRUPTED
        record.error = "interrupted; pointers moved only for a completed commit"
        _save_record(config, out, record, deadline)
        raise
    except Exception as exc:  # a bug or an unexpected Ray error: keep its traceback, but say so in the record
        record.exit_status, record.error = ExitStatus.ENVIRONMENT, f"{type(exc).__name__}: {first_line(exc)}"
        _save_record(config, out, record, deadline)
        raise
    record.run_id, record.exit_status = report.run_id, report.exit_code
    record.counts = {"adapters": len(report.adapters), **{str(s): len(report.by_status(s)) for s in (
        AdapterStatus.COMMITTED, AdapterStatus.UNCHANGED, AdapterStatus.HELD, AdapterStatus.FAILED)}}
    record.set_failed(_reasons(report.adapters, AdapterStatus.FAILED))
    record.set_held(_reasons(report.adapters, AdapterStatus.HELD))
    record.warnings = report.warnings[:100]
    problem = _save_record(config, out, record, deadline)
    report.warnings, report.exit_code = record.warnings, record.exit_status  # on_publish's, metrics', tracking's
    if problem:
        report.warnings.append(problem)
        report.exit_code = report.exit_code or ExitStatus.ENVIRONMENT  # a run nobody can see did not go well
        record.exit_status, record.error = report.exit_code, problem  # what --summary-json and submit see
    report.record = record
    return report


def _save_record(config: FleetConfig, out: Dir, record: RunRecord, deadline: Deadline) -> str | None:
    """The run's reports (on_publish, metrics, tracking: their warnings go into it), then its record."""
    record.ended_at = utc_now()
    report_fleet_run(config, out, record)
    try:
        call_within(lambda: write_run_record(out, record), deadline.cleanup_s(),
                "writing the run record past max_run_seconds (the store does not answer)")
    except (SafeMergeError, OSError) as exc:
        return f"the run record could not be written to {out.uri}: {exc}"
    return None


def _run(config: FleetConfig, out: Dir, progress: bool, run_id: str | None, ray_address: str | None,
         runtime_env: dict | None, lock: RunLock, record: RunRecord, deadline: Deadline,
         clock: PhaseClock) -> FleetReport:
    driver_before = BYTES_READ.total
    with clock.timed(Phase.PLAN):
        rehash = _verification_due(config.verify_published, out)
        config = pin_safety_adapter(config)
        plan = plan_fleet(config, out, deadline, rehash=rehash)
        if rehash and not deadline.passed():
            out.write(VERIFIED, json_bytes({"verified_at": utc_now(), "time": time.time()}))
    states, fingerprints, warnings, pending = plan.states, plan.fingerprints, plan.warnings, plan.pending
    _log(f"{len(states)} adapters: {len(pending)} to repair, "
         f"{len(plan.by_status(AdapterStatus.UNCHANGED))} unchanged, {len(plan.by_status(AdapterStatus.FAILED))} "
         "invalid")
    if not pending:
        warnings += deadline.warnings()
        return FleetReport(None, out.uri, states, exit_status(states), warnings, BYTES_READ.total - driver_before)

    if config.gate is not None:  # the gate's prompt files and judge, before an hour of work needs them
        read_prompt_sets(config.gate.eval, config.s3)
    run_id = LOG.run_id = run_id or new_run_id()
    with clock.timed(Phase.PLAN):
        jobs = plan_jobs(pending, config.safety_adapter)
        for st in pending:
            st.plans = []  # the worker that assembles an adapter plans it again from the headers it holds
    with clock.timed(Phase.RAY):
        init_ray(ray_address, runtime_env, quiet=not progress)
    with scored(config, out, pending, jobs, progress, deadline, clock) as workers:
        with clock.timed(Phase.ASSEMBLE):
            _assemble(config, workers, out, run_id, [st for st in pending if st.status == AdapterStatus.PENDING],
                      progress, deadline)
        read_by_workers = 0 if deadline.passed() else worker_bytes(workers)  # late workers may still be busy
    evaluation = None
    if config.gate is not None:
        with clock.timed(Phase.GATE):
            evaluation = _gate(config, out, run_id, states, deadline)
    warnings += deadline.warnings()
    written = any(st.status in (AdapterStatus.ASSEMBLED, AdapterStatus.HELD) for st in states)
    report = FleetReport(run_id if written else None, out.uri, states, ExitStatus.OK, warnings)
    if report.run_id:
        with clock.timed(Phase.COMMIT):
            lock.confirm()  # another run may be writing pointers now: ours must not move
            _commit(config, out, report.run_id, states, fingerprints, report, evaluation, record)
    report.bytes_read = BYTES_READ.total - driver_before + read_by_workers
    report.exit_code = exit_status(states)
    _log(f"phases: {clock.line()}", phase_s=clock.seconds)
    return report


def score_fleet(config: FleetConfig, progress: bool = True, ray_address: str | None = None,
                runtime_env: dict | None = None) -> tuple[dict[str, dict[str, float]], FleetPlan]:
    """Every valid adapter's rho per module, scored once on Ray whatever is published; writes nothing.
    (SafeLoRA adapters are scored as SafeMERGE ones: rho is the same, and no projection is needed.)"""
    out = open_dir(config.output, what="output", s3=config.s3, must_exist=False)
    config = pin_safety_adapter(config)
    plan = plan_fleet(config, out, redo_all=True)
    pending = plan.pending
    if not pending:
        return {}, plan
    for st in pending:
        st.settings = replace(st.settings, policy=PolicyName.SAFEMERGE)
    init_ray(ray_address, runtime_env, quiet=not progress)
    # No safety adapter and no output: rho alone, not the repairs' effect, and nothing written.
    with scored(config, None, pending, plan_jobs(pending), progress, Deadline(config.max_run_seconds), PhaseClock()):
        pass
    return {st.ref.name: {m: s.rho for m, s in st.scores.items()}
            for st in pending if st.status == AdapterStatus.PENDING}, plan


@contextlib.contextmanager
def scored(config: FleetConfig, out: Dir | None, pending: list[AdapterState], jobs: list[ModuleJob],
            progress: bool, deadline: Deadline, clock: PhaseClock):
    """Start the workers, check them (preflight, memory), score every pending adapter, and yield the warm
    workers for what follows; they are killed on the way out, whatever happens."""
    import ray

    with clock.timed(Phase.PREFLIGHT):
        workers = start_workers(config, len(jobs), deadline.at)
    try:
        with clock.timed(Phase.PREFLIGHT):
            jobs = check_memory(config, jobs, preflight(config, out, workers, pending))
        with clock.timed(Phase.SCORE):
            _score(workers, jobs, pending, progress, deadline)
        yield workers
    finally:
        for worker in workers:
            ray.kill(worker)


def worker_bytes(workers: list) -> int:
    """Bytes read by the live workers (a worker lost and restarted counts from its restart)."""
    import ray

    total = 0
    for worker in workers:
        try:
            total += ray.get(worker.bytes_read.remote(), timeout=60)
        except ray.exceptions.RayError:
            pass  # lost: its adapters already failed, and the accounting is not worth a failed run
    return total



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
    for task, results, error in gather(tasks, submit, deadline):
        if error is not None:  # its worker stayed lost
            worst = max(task.jobs, key=lambda j: j.cost.peak)
            raise EnvironmentFailure(worker_lost(error, f"scoring module {worst.module}", worst.cost))
        if results is None:  # the deadline
            for job in task.jobs:
                for req in job.requests:
                    if by_name[req.adapter].status == AdapterStatus.PENDING:
                        by_name[req.adapter].fail(deadline.failure("scored"))
            continue
        for result in results:
            batches += result.batches
            for name, score in result.scores.items():
                by_name[name].scores[result.module] = score
            for name, ref in result.carried.items():
                by_name[name].carried[result.module] = ref
            for name, failure in result.errors.items():
                if by_name[name].status == AdapterStatus.PENDING:
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
    fetches what scoring carried for it (projected Bs, repaired layers) from Ray's object store itself."""
    index = {st.ref.name: i for i, st in enumerate(pending)}

    def submit(st: AdapterState, attempt: int):
        worker = workers[(index[st.ref.name] + attempt) % len(workers)]
        return worker.assemble.remote(st.ref.name, st.ref.uri, st.fingerprint, config.safety_adapter, st.scores,
                                      st.carried, st.settings, out, adapter_prefix(run_id, st.ref.name))

    bar = Progress("assemble", len(pending), unit="adapters written") if progress else None
    for st, result, error in gather(pending, submit, deadline):
        if error is not None:
            st.fail(Failure(worker_lost(error, f"assembling {st.ref.name}"), True))
        elif result is None:
            st.fail(deadline.failure("written"))
        elif result.error is not None:
            st.fail(result.error)
        else:
            st.status, st.objects, st.decisions = AdapterStatus.ASSEMBLED, result.objects, result.decisions
            st.counts = result.counts
        st.scores, st.carried = {}, {}  # done with: the carried tensors leave the object store
        if bar:
            bar.advance()


def _hold(states: list[AdapterState], reason: str) -> None:
    """Hold back every one of `states` for `reason`: the gate gave no verdict on them."""
    for st in states:
        st.status, st.reason = AdapterStatus.HELD, reason


def _gate(config: FleetConfig, out: Dir, run_id: str, states: list[AdapterState], deadline: Deadline):
    """Evaluate the run's repaired adapters (where they are written, not yet published); hold back every
    one that fails the gate. Returns the evaluation (None if it failed or never started: then every
    adapter is held)."""
    assert config.gate is not None
    assembled = [st for st in states if st.status == AdapterStatus.ASSEMBLED]
    if not assembled:
        return None
    if deadline.passed():  # nothing unchecked is published, and no evaluation starts past the deadline
        return _hold(assembled, "gate: not evaluated: the run's deadline (max_run_seconds) passed")
    _log(f"gate: evaluating {len(assembled)} repaired adapters")
    pairs = [Pair(st.ref.name, st.ref.uri, f"{out.uri.rstrip('/')}/{adapter_prefix(run_id, st.ref.name)}")
             for st in assembled]
    gate = config.gate
    try:  # an evaluation still running at the deadline is not waited for: nothing unchecked is published
        outcome = call_within(lambda: run_gate(gate, config.aligned_model, pairs, config.s3),
                          deadline.wait_s(math.inf) if deadline.at is not None else None, "the gate's evaluation")
    except TimedOut:
        return _hold(assembled, "gate: not evaluated within the run's max_run_seconds")
    except EnvironmentFailure as exc:  # an evaluation that could not run: nothing unchecked is published either
        return _hold(assembled, f"gate: the evaluation failed: {first_line(exc)}")
    for st in assembled:
        st.gate = outcome.numbers.get(st.ref.name)
        if st.ref.name in outcome.held:
            st.status, st.reason = AdapterStatus.HELD, outcome.held[st.ref.name]
    _log(f"gate: {len(assembled) - len(outcome.held)} passed, {len(outcome.held)} held back")
    return outcome.result


def _commit(config: FleetConfig, out: Dir, run_id: str, states: list[AdapterState], fingerprints: dict,
            report: FleetReport, evaluation: EvalResult | None, record: RunRecord) -> None:
    """The run's decisions, evaluation and summary, then the output store's commit (manifest, then pointers).
    Adapters held back by the gate are listed with why, and their pointers stay. The record names the run as
    soon as its manifest is written: a run stopped while pointers move is still named by its record."""
    assembled = [st for st in states if st.status == AdapterStatus.ASSEMBLED]
    written = [st for st in states if st.status in (AdapterStatus.ASSEMBLED, AdapterStatus.HELD)]
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
               _reasons(states, AdapterStatus.FAILED), held=_reasons(states, AdapterStatus.HELD),
               on_committed=lambda: setattr(record, "run_id", run_id))
    for st in assembled:
        st.status = AdapterStatus.COMMITTED


def _adapter_summary(st: AdapterState) -> dict:
    committed = AdapterStatus.COMMITTED if st.status == AdapterStatus.ASSEMBLED else st.status
    entry: dict[str, object] = {"status": str(committed), "uri": st.ref.uri}
    if st.reason:
        entry["reason"] = st.reason
    if st.counts:
        entry["counts"] = st.counts
    if st.status == AdapterStatus.UNCHANGED:
        entry["run_id"] = st.previous_run
    if st.why:
        entry["why"] = st.why
    if st.gate:
        entry["gate"] = st.gate
    return entry


VERIFY_EVERY_S = {"always": 0.0, "daily": 86400.0, "weekly": 7 * 86400.0}


def _verification_due(schedule: str, out: Dir) -> bool:
    """Whether this run re-hashes what it would leave unchanged: `always`, or the schedule's interval has
    passed since a run last did (status/verified.json)."""
    if schedule not in VERIFY_EVERY_S:
        return False
    last = (read_json(out, VERIFIED) or {}).get("time")
    return not isinstance(last, (int, float)) or time.time() - last >= VERIFY_EVERY_S[schedule]


def _reasons(states: list[AdapterState], status: AdapterStatus) -> dict[str, str]:
    return {st.ref.name: st.reason for st in states if st.status == status}
