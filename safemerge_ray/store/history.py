"""Read-only views of a fleet output: the fleet's current state (`status`), its runs (`runs`), and what
changed between two runs (`diff`). Everything comes from pointers, manifests, run records and the runs'
decision tables; nothing is written.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum

import pyarrow as pa

from ..errors import SafeMergeError
from ..io import Dir, read_json
from .decisions import DECISION_SCHEMA, table_from_bytes
from .layout import (
    DECISIONS,
    HISTORY,
    LAST_RUN,
    LATEST,
    RUNS,
    check_run_id,
    manifest_key,
    published_names,
    read_pointer,
    run_prefix,
    versioned_name,
)
from .records import RecordKind
from .verify import published_damage

RHO_CHANGED = 1e-6  # a rho that moves less than this is float noise (batched GEMMs of another shape)


class Decisions:
    """Runs' decision tables, each read once and grouped by adapter once."""

    def __init__(self, out: Dir):
        self.out = out
        self._by_adapter: dict[str, dict[str, list[dict]] | None] = {}

    def _load(self, run_id: str) -> dict[str, list[dict]] | None:
        if run_id not in self._by_adapter:
            key = f"{run_prefix(run_id)}{DECISIONS}"
            grouped: dict[str, list[dict]] | None = None
            try:
                if self.out.exists(key):
                    grouped = {}
                    for row in table_from_bytes(self.out.read(key)).to_pylist():
                        grouped.setdefault(row["adapter"], []).append(row)
            except (SafeMergeError, pa.ArrowInvalid):
                grouped = None
            self._by_adapter[run_id] = grouped
        return self._by_adapter[run_id]

    def rows(self, run_id: str, adapter: str) -> list[dict]:
        return (self._load(run_id) or {}).get(adapter, [])

    def all(self, run_id: str) -> list[dict] | None:
        """Every row of a run, or None when the run has no readable decision table."""
        grouped = self._load(run_id)
        return None if grouped is None else [row for rows in grouped.values() for row in rows]


# --------------------------------------------------------------------------- status


class PublishedState(StrEnum):
    """An adapter's state in `status`."""

    PUBLISHED = "published"
    HELD = "held"  # the last run's gate held a newer repair back
    DAMAGED = "damaged"  # its published objects changed or went missing
    STALE = "stale"  # the next run would redo it
    ORPHANED = "orphaned"  # no longer in the fleet
    UNPUBLISHED = "unpublished"
    FAILED = "failed"  # its inputs fail


class NextRun(StrEnum):
    """What the next fleet run would do with an adapter (from its plan)."""

    REDO = "redone"
    UNCHANGED = "unchanged"
    FAILED = "failed"


@dataclass(frozen=True)
class Planned:
    """One adapter in the fleet's plan, as `status --config` shows it."""

    next: NextRun
    detail: str = ""  # why it is redone, or why it fails


@dataclass
class AdapterStatus:
    adapter: str
    state: PublishedState
    run_id: str | None = None
    committed_at: str | None = None
    repaired: int | None = None
    modules: int | None = None
    lowest_rho: float | None = None
    repaired_rho: tuple[float, float] | None = None  # mean rho of the repaired layers, before and after repair
    detail: str = ""  # why damaged / stale / orphaned / failed
    version: str | None = None  # its stable name, `<adapter>@<run_id>` (what `export` and serving load)


def fleet_status(out: Dir, plan: dict[str, Planned] | None = None) -> tuple[list[AdapterStatus], list[dict]]:
    """Every published adapter (and, with the fleet's plan, every adapter of the fleet): its current run,
    when, layers repaired / total, lowest rho, and whether it is stale (the next run would redo it: why),
    orphaned (no longer in the fleet), damaged, or unpublished. Also the current decisions, one table."""
    names = published_names(out)
    manifests: dict[str, dict | None] = {}
    decisions = Decisions(out)
    statuses, rows = [], []
    last = read_json(out, LAST_RUN) or {}
    held = last.get("held") or {}  # the last run's gate held these back: shown even if never published
    for name in sorted(set(names) | set(plan or {}) | set(held)):
        pointer = read_pointer(out, name)
        if pointer is None:
            st = plan.get(name) if plan else None
            failed = st is not None and st.next == NextRun.FAILED
            statuses.append(AdapterStatus(name, PublishedState.FAILED if failed else PublishedState.UNPUBLISHED,
                                          detail=st.detail if failed and st else ""))
            continue
        run_id = str(pointer.get("run_id"))
        mine = decisions.rows(run_id, name)
        rows += [dict(r, run_id=run_id) for r in mine]
        status = AdapterStatus(name, PublishedState.PUBLISHED, run_id, pointer.get("committed_at"),
                               sum(r["merged"] for r in mine) if mine else None, len(mine) or None,
                               min((r["rho"] for r in mine), default=None), repaired_rho(mine),
                               version=versioned_name(name, run_id))
        damage = published_damage(out, name, pointer, manifests)
        if damage:
            status.state, status.detail = PublishedState.DAMAGED, damage
        elif plan is not None and name not in plan:
            status.state = PublishedState.ORPHANED
            status.detail = "no longer in the fleet; its pointer stays until removed"
        elif plan is not None and plan[name].next == NextRun.REDO:
            status.state, status.detail = PublishedState.STALE, plan[name].detail
        elif plan is not None and plan[name].next == NextRun.FAILED:
            status.detail = f"its inputs now fail: {plan[name].detail}"
        statuses.append(status)
    if not statuses:
        raise SafeMergeError(f"status: {out.uri} has no published adapters (no {LATEST}*.json) and no config was given")
    for status in statuses:  # the last run's gate held back a newer repair: the pointer is older on purpose
        reason = held.get(status.adapter)
        if reason and status.state in (PublishedState.PUBLISHED, PublishedState.STALE, PublishedState.UNPUBLISHED):
            kept = f"; still on run {status.run_id}" if status.run_id else "; nothing published yet"
            status.state, status.detail = PublishedState.HELD, f"run {last.get('run_id')} held it back: {reason}{kept}"
    return statuses, rows


def repaired_rho(rows: list[dict]) -> tuple[float, float] | None:
    """Mean rho of the repaired layers before and after their repair (runs that recorded it)."""
    done = [r for r in rows if r["merged"] and r.get("rho_after") is not None]
    if not done:
        return None
    return sum(r["rho"] for r in done) / len(done), sum(r["rho_after"] for r in done) / len(done)


def format_status(statuses: list[AdapterStatus]) -> str:
    width = max([len("version")] + [len(s.version or "-") for s in statuses])
    lines = [f"{'adapter':<20} {'state':<11} {'run':<26} {'repaired':>9} {'min rho':>8} {'repaired rho':>15}  "
             f"{'version':<{width}}  detail"]
    for s in statuses:
        repaired = f"{s.repaired}/{s.modules}" if s.modules else "-"
        rho = f"{s.lowest_rho:.4f}" if s.lowest_rho is not None else "-"
        moved = f"{s.repaired_rho[0]:.3f} -> {s.repaired_rho[1]:.3f}" if s.repaired_rho else "-"
        lines.append(f"{s.adapter:<20} {s.state:<11} {s.run_id or '-':<26} {repaired:>9} {rho:>8} {moved:>15}  "
                     f"{s.version or '-':<{width}}  {s.detail}".rstrip())
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    lines.append(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return "\n".join(lines)


def status_json(statuses: list[AdapterStatus]) -> str:
    return json.dumps({"adapters": [asdict(s) for s in statuses]}, indent=2)


def decisions_table(rows: list[dict]) -> pa.Table:
    """The current decisions of every adapter, each row with the run it comes from."""
    schema = DECISION_SCHEMA.append(pa.field("run_id", pa.string()))
    return pa.Table.from_pylist(rows, schema=schema)


# --------------------------------------------------------------------------- runs


@dataclass
class RunEntry:
    started_at: str
    kind: str
    run_id: str | None
    exit_status: int
    counts: dict
    error: str | None
    inputs: dict = field(default_factory=dict)  # role -> fingerprint (first 12), for committed runs


def list_runs(out: Dir) -> list[RunEntry]:
    """Every run record in the history (nights with nothing to do and failed runs included), oldest first."""
    entries = []
    for name in out.child(HISTORY).list():
        record = read_json(out, f"{HISTORY}{name}")
        if record is None:
            continue
        entry = RunEntry(record.get("started_at", ""), record.get("kind", RecordKind.FLEET), record.get("run_id"),
                         int(record.get("exit_status", 0)), record.get("counts") or {}, record.get("error"))
        if entry.run_id and entry.kind == RecordKind.FLEET:
            manifest = read_json(out, manifest_key(entry.run_id)) or {}
            entry.inputs = {role: str((meta or {}).get("fingerprint") or "-")[:12]
                            for role, meta in manifest.get("inputs", {}).items()}
        entries.append(entry)
    if not entries and not out.child(RUNS).subdirs():
        raise SafeMergeError(f"runs: {out.uri} has no run history (no {HISTORY})")
    return sorted(entries, key=lambda e: e.started_at)


def format_runs(entries: list[RunEntry]) -> str:
    lines = [f"{'started':<21} {'kind':<8} {'run':<26} {'exit':>4}  {'committed':>9} {'unchanged':>9} {'held':>4} "
             f"{'failed':>6}  inputs (unaligned/aligned/safety) or error"]
    for e in entries:
        c = e.counts
        what = "/".join(e.inputs.get(r, "-") for r in ("unaligned_model", "aligned_model", "safety_adapter")) \
            if e.inputs else (e.error or "")[:80]
        lines.append(f"{e.started_at:<21} {e.kind:<8} {e.run_id or '-':<26} {e.exit_status:>4}  "
                     f"{c.get('committed', '-'):>9} {c.get('unchanged', '-'):>9} {c.get('held', '-'):>4} "
                     f"{c.get('failed', '-'):>6}  {what}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- diff


@dataclass
class LayerChange:
    module: str
    rho_before: float | None
    rho_after: float | None
    repaired_before: bool | None
    repaired_after: bool | None


@dataclass
class AdapterDiff:
    adapter: str
    run_before: str | None
    run_after: str
    why: list[str]  # what the later run recorded as its reason to redo the adapter
    layers: list[LayerChange]


def committed_runs_of(out: Dir, adapter: str) -> list[str]:
    """The committed runs that published `adapter`, oldest first."""
    return [r for r in sorted(out.child(RUNS).subdirs())
            if adapter in ((read_json(out, manifest_key(r)) or {}).get("adapters") or {})]


def diff_runs(out: Dir, before: str | None, after: str, adapters: list[str] | None = None) -> list[AdapterDiff]:
    """Per adapter committed in `after` (and in `before`, when given): the layers whose decision or rho
    changed, and why `after` redid it."""
    for run in (before, after):
        if run is not None:
            check_run_id(run, "diff")
    decisions = Decisions(out)
    after_manifest = read_json(out, manifest_key(after))
    if after_manifest is None:
        raise SafeMergeError(f"diff: run {after} has no readable manifest in {out.uri}")
    if before is not None and read_json(out, manifest_key(before)) is None:
        raise SafeMergeError(f"diff: run {before} has no readable manifest in {out.uri}")
    names = adapters or sorted(after_manifest.get("adapters", {}))
    diffs = []
    for name in names:
        entry = after_manifest.get("adapters", {}).get(name)
        if entry is None:
            continue
        old = {r["module"]: r for r in decisions.rows(before, name)} if before else {}
        new = {r["module"]: r for r in decisions.rows(after, name)}
        layers = []
        for module in sorted(set(old) | set(new)):
            a, b = old.get(module), new.get(module)
            moved = a is None or b is None or a["merged"] != b["merged"] or abs(a["rho"] - b["rho"]) > RHO_CHANGED
            if moved:
                layers.append(LayerChange(module, a["rho"] if a else None, b["rho"] if b else None,
                                          a["merged"] if a else None, b["merged"] if b else None))
        diffs.append(AdapterDiff(name, before, after, list(entry.get("why") or []), layers))
    return diffs


def format_diff(diffs: list[AdapterDiff], limit: int = 40) -> str:
    lines = []
    for d in diffs:
        if not d.layers and d.run_before:
            continue
        repaired = [(c.repaired_before, c.repaired_after) for c in d.layers]
        gained = sum(1 for a, b in repaired if b and not a)
        lost = sum(1 for a, b in repaired if a and not b)
        lines.append(f"{d.adapter}: {d.run_before or '(none)'} -> {d.run_after}: {len(d.layers)} layer(s) changed "
                     f"(+{gained} repaired, -{lost}); why: {'; '.join(d.why) or 'not recorded'}")
        for c in d.layers[:limit]:
            def fmt(rho, merged):
                return "-" if rho is None else f"{rho:.4f}{' repaired' if merged else ''}"
            lines.append(f"  {c.module:<48} {fmt(c.rho_before, c.repaired_before):>17} -> "
                         f"{fmt(c.rho_after, c.repaired_after)}")
        if len(d.layers) > limit:
            lines.append(f"  ... and {len(d.layers) - limit} more")
    return "\n".join(lines) or "no adapter changed a decision or rho"
