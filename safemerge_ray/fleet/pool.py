"""The fleet's pool of workers on Ray: how many and how large, started and checked (preflight, memory),
tasks gathered as they finish (a lost worker's tasks resubmitted), and killed whatever happens."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from functools import partial
from pathlib import Path

from ..cluster import cluster_gpus
from ..core import PROCESS_BASELINE, ModuleCost, check_fits, fmt
from ..errors import EnvironmentFailure, SafeMergeError, first_line
from ..io import Dir
from ..progress import log
from .config import FleetConfig
from .jobs import Deadline, ModuleJob, PreflightResult, format_problems
from .plan import AdapterState
from .worker import FleetWorker

_log = partial(log, "fleet")


def actor_shape(config: FleetConfig, n_jobs: int) -> tuple[int, float, int, str]:
    """(actors, gpus per actor, cpus per actor, device) from the config and the cluster's resources."""
    import ray

    cpus, gpus = int(ray.cluster_resources().get("CPU", 1)), cluster_gpus()
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


def start_workers(config: FleetConfig, n_jobs: int, deadline: float | None) -> list:
    import ray

    n_actors, gpus_per_actor, cpus_per_actor, device = actor_shape(config, n_jobs)
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
        where = (f"ray.memory_per_worker is {fmt(config.memory_per_worker)}, of which the process itself takes about "
                 f"{fmt(PROCESS_BASELINE)}, leaving {fmt(max(have, 0))}")
    else:
        per_node: dict[str, list[PreflightResult]] = {}
        for r in results:
            per_node.setdefault(r.node_id, []).append(r)
        here = min(per_node.values(), key=lambda rs: min(r.memory_available for r in rs) / len(rs))
        free = min(r.memory_available for r in here)
        have, where = free // len(here), f"worker node {here[0].node} has {fmt(free)} free for {len(here)} worker(s)"
    check_fits(worst.cost, have, where)
    return [replace(job, budget=have) for job in jobs]


def preflight(config: FleetConfig, out: Dir | None, workers: list,
               pending: list[AdapterState]) -> list[PreflightResult]:
    """Every worker checks, from its own node, every input it will read and the output it will write.

    Waits at most `ray.start_timeout_s` for the workers to be placed (an autoscaling cluster may need
    to add nodes first). Raises one line per problem, naming the node and the cause.
    """
    import ray

    marker = None
    if out is not None and out.local_path is not None:  # the workers must see this disk: each reads a marker
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


def worker_lost(exc: BaseException, doing: str, cost: ModuleCost | None = None) -> str:
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


def gather(items: list, submit, deadline: Deadline):
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
