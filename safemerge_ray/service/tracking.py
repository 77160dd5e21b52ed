"""A run in MLflow: one MLflow run per fleet, train-safety and eval run, with its parameters, metrics, tags and
files. The client is `mlflow-skinny` (the `mlflow` extra); the tracking server is the team's own."""

from __future__ import annotations

import os
import re

from .. import __version__
from ..errors import SafeMergeError
from .sections import TrackedRun, TrackingSection

_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")  # what MLflow accepts in a param or metric name


def _key(name: str) -> str:
    return _KEY.sub("_", name)[:250]


def track_run(section: TrackingSection, run: TrackedRun) -> str:
    """Log the run; returns its MLflow run id (raises when the server cannot be reached: see notify)."""
    try:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise SafeMergeError("tracking: needs MLflow's client: pip install 'safemerge-ray[mlflow]'") from None
    # MLflow writes "View run ... at" to stdout when a run ends: stdout is the command's (its JSON log lines too),
    # and the run's id is printed by us.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    client = MlflowClient(tracking_uri=section.mlflow)
    experiment = client.get_experiment_by_name(section.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(section.experiment)
    outcome = run.outcome
    tags = {"safemerge.command": str(run.command), "safemerge.exit_status": str(outcome.exit_status),
            "safemerge.tool_version": __version__, "safemerge.run_id": outcome.run_id or "",
            **({"safemerge.error": outcome.error[:5000]} if outcome.error else {})}
    name = f"{run.command}-{outcome.run_id}" if outcome.run_id else str(run.command)
    created = client.create_run(experiment_id, start_time=int(outcome.started * 1000), tags=tags, run_name=name)
    run_id = created.info.run_id
    stamp = int(outcome.ended * 1000)
    metrics = [Metric(_key(k), float(v), stamp, 0) for k, v in sorted(run.metrics.items())]
    metrics += [Metric(_key(k), float(v), stamp, step) for k, series in run.steps.items() for step, v in series]
    params = [Param(_key(k), str(v)[:6000]) for k, v in sorted(run.params.items())]
    for i in range(0, len(params), 100):  # a batch holds at most 100 params and 1,000 metrics
        client.log_batch(run_id, params=params[i:i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    for file_name, data in sorted(run.artifacts.items()):
        _log_bytes(client, run_id, file_name, data)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(run_id, status="FINISHED" if outcome.succeeded else "FAILED", end_time=stamp)
    return run_id


def _log_bytes(client, run_id: str, name: str, data: bytes) -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="safemerge-artifact-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        client.log_artifact(run_id, str(path))
