"""The fleet's work units and what comes back from them: small frozen objects that travel between the driver
and the workers (module jobs, score tasks, results, failures), and the run's deadline."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa

from ..core import MergeSettings, ModuleCost, natural_key
from ..engine import ModuleScore
from ..errors import EnvironmentFailure

if TYPE_CHECKING:
    from ray import ObjectRef


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


# Neighbouring modules share a task while their weights and all adapters' factors stay under this.
TASK_BYTES = 64 * 2**20


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
    scores: dict[str, ModuleScore] = field(default_factory=dict)  # their tensors, if any, moved to:
    carried: dict[str, ObjectRef] = field(default_factory=dict)  # adapter -> (projected B, repaired layer), Ray's store
    errors: dict[str, Failure] = field(default_factory=dict)
    batches: int = 0  # scoring batches (one per rank, more when the budget splits them)

    def stash_carried(self) -> None:
        """Move the tensors a score carries to assembly (SafeLoRA's projected B, a layer repaired in scoring) into
        Ray's object store (this worker owns them): the driver gets references, and the assembly that needs them
        fetches them. Outside Ray (tests call a worker directly) they stay inline."""
        import ray

        if not ray.is_initialized():
            return
        for adapter, score in list(self.scores.items()):
            if score.projected_b is not None or score.repaired is not None:
                self.carried[adapter] = ray.put((score.projected_b, score.repaired))
                self.scores[adapter] = score._replace(projected_b=None, repaired=None)


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


@dataclass
class AssemblyResult:
    adapter: str
    error: Failure | None = None
    objects: dict[str, dict] = field(default_factory=dict)  # written object -> {sha256, bytes}
    decisions: pa.Table | None = None
    counts: dict = field(default_factory=dict)


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


def balance(tasks: list[ScoreTask], n: int) -> list[list[ScoreTask]]:
    """Split tasks into n shards of about equal bytes (largest first onto the lightest shard)."""
    shards: list[list[ScoreTask]] = [[] for _ in range(n)]
    loads = [0] * n
    for task in sorted(tasks, key=lambda t: (-t.nbytes, natural_key(t.jobs[0].module))):
        i = loads.index(min(loads))
        shards[i].append(task)
        loads[i] += task.nbytes
    return [sorted(s, key=lambda t: natural_key(t.jobs[0].module)) for s in shards if s]


CLEANUP_S = 30.0  # at most this long past the deadline for a hung store (see Deadline.cleanup_s) ...
CLEANUP_MIN_S = 5.0  # ... and at least this long, so that a healthy store is never cut off


def cleanup_bound(max_run_seconds: float) -> float:
    """How long past the deadline the store calls still owed may take, together."""
    return min(CLEANUP_S, max(CLEANUP_MIN_S, 0.1 * max_run_seconds))


class Deadline:
    """`max_run_seconds` from the run's start; `None` seconds: no deadline."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.at = time.time() + seconds if seconds else None  # wall clock: it travels to workers
        self.missed = 0  # adapters failed for it
        self._cleanup_until: float | None = None  # see cleanup_s

    def passed(self) -> bool:
        return self.at is not None and time.time() >= self.at

    def wait_s(self, most: float) -> float:
        return most if self.at is None else max(0.0, min(most, self.at - time.time()))

    def cleanup_s(self) -> float | None:
        """Once the deadline has passed, how long the store calls still owed (the run record, the lock's
        release) may still take: together the smaller of 30 s and 10% of max_run_seconds (but at least 5 s:
        a healthy store answers within it), counted from the first of them. None before the deadline."""
        if not self.seconds or not self.passed():
            return None
        if self._cleanup_until is None:
            self._cleanup_until = time.time() + cleanup_bound(self.seconds)
        return max(0.0, self._cleanup_until - time.time())

    def warnings(self) -> list[str]:
        return [f"max_run_seconds ({self.seconds:g} s) reached: {self.missed} adapter(s) not finished; their "
                "previous pointers stay"] if self.missed else []

    def failure(self, what: str) -> Failure:
        self.missed += 1
        return Failure(f"not {what} within max_run_seconds ({self.seconds:g} s); its previous pointer stays", True)
