"""The fleet run's reports, made from its run record and what the run stored: metrics for the Pushgateway, the
tracked run for MLflow, and the `on_publish` command after a commit. None of them can fail the run; what goes
wrong is a warning in the record (and `on_publish`'s failure also the exit status: it is the team's hand-off)."""

from __future__ import annotations

import datetime as _dt
import statistics

from .. import __version__
from ..errors import ExitStatus
from ..io import Dir, json_bytes, read_json
from ..service import Command, RunOutcome, TrackedRun, report_run, run_on_publish
from ..store import DECISIONS, MANIFEST, REPORT, SUMMARY, RunRecord, run_prefix, table_from_bytes
from .config import FleetConfig


def _epoch(stamp: str) -> float:
    return _dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.UTC).timestamp()


def outcome_of(record: RunRecord) -> RunOutcome:
    adapters = {**{n: "failed" for n in record.failed if n != "..."}, **{n: "held" for n in record.held if n != "..."}}
    return RunOutcome(Command.FLEET, _epoch(record.started_at), record.exit_status, run_id=record.run_id,
                      counts=dict(record.counts), adapters=adapters, error=record.error, phase_s=dict(record.phase_s))


def report_fleet_run(config: FleetConfig, out: Dir | None, record: RunRecord) -> None:
    """After a run (any outcome, before its record is written): `on_publish` if it committed, then the metrics
    and the tracked run. Warnings go into the record."""
    if config.on_publish and record.run_id and out is not None:
        problem = run_on_publish(config.on_publish, record.to_dict())
        if problem:
            record.warnings.append(problem)
            record.exit_status = record.exit_status or ExitStatus.ENVIRONMENT  # published, but not handed on
    if config.metrics is None and config.tracking is None:
        return
    outcome = outcome_of(record)
    done = report_run(config.metrics, config.tracking, outcome, lambda: tracked_run(config, out, record, outcome))
    record.warnings += done.warnings
    if done.tracked_run:
        record.tracked_run = done.tracked_run


def tracked_run(config: FleetConfig, out: Dir | None, record: RunRecord, outcome: RunOutcome) -> TrackedRun:
    """The run as MLflow shows it: settings and inputs as parameters, counts and per-adapter numbers as
    metrics, the run's stored files as artifacts."""
    params = {f"merge.{k}": str(v) for k, v in config.merge.to_dict().items()}
    params.update(tool_version=__version__, config=config.source, output=record.output)
    params.update({f"overrides.{name}": str(s.to_dict()) for name, s in sorted(config.overrides.items())})
    metrics = {f"adapters.{k}": float(v) for k, v in record.counts.items()}
    metrics.update({f"phase_s.{phase}": s for phase, s in record.phase_s.items()})
    artifacts: dict[str, bytes] = {"last_run.json": json_bytes(record.to_dict())}
    if out is not None and record.run_id:
        prefix = run_prefix(record.run_id)
        for name in (SUMMARY, MANIFEST, "eval.json", REPORT):
            data = _read(out, prefix + name)
            if data is not None:
                artifacts[name] = data
        manifest = read_json(out, prefix + MANIFEST) or {}
        params.update({f"input.{role}.fingerprint": str(entry.get("fingerprint"))
                       for role, entry in manifest.get("inputs", {}).items()})
        metrics.update(_adapter_metrics(out, prefix, read_json(out, prefix + SUMMARY) or {}))
    return TrackedRun(Command.FLEET, outcome, params=params, metrics=metrics, artifacts=artifacts)


def _adapter_metrics(out: Dir, prefix: str, summary: dict) -> dict[str, float]:
    """Per adapter: layers repaired, lowest and mean rho before and after the repair, the gate's numbers."""
    metrics: dict[str, float] = {}
    for name, entry in summary.get("adapters", {}).items():
        if "counts" in entry:
            metrics[f"{name}.layers_repaired"] = float(entry["counts"].get("repaired", 0))
        for key, value in (entry.get("gate") or {}).items():
            if isinstance(value, (int, float)):
                metrics[f"{name}.gate.{key}"] = float(value)
    data = _read(out, prefix + DECISIONS)
    if data is None:
        return metrics
    table = table_from_bytes(data)
    by_adapter: dict[str, tuple[list[float], list[float]]] = {}
    for row in table.select(["adapter", "rho", "rho_after"]).to_pylist():
        if row["rho"] is None:  # a module the safety adapter does not adapt: not scored
            continue
        before, after = by_adapter.setdefault(row["adapter"], ([], []))
        before.append(row["rho"])
        after.append(row["rho"] if row["rho_after"] is None else row["rho_after"])  # a layer kept as it was
    for name, (before, after) in by_adapter.items():
        metrics.update({f"{name}.rho_min": min(before), f"{name}.rho_mean": statistics.fmean(before),
                        f"{name}.rho_after_min": min(after), f"{name}.rho_after_mean": statistics.fmean(after)})
    return metrics


def _read(out: Dir, name: str) -> bytes | None:
    tagged = out.read_tagged(name)
    return tagged[0] if tagged else None
