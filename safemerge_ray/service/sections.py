"""The service settings every command shares (`metrics:`, `tracking:` in a config file; `--pushgateway`,
`--tracking-uri` on the command line), and what a finished run hands to them."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import urlparse

from pydantic import Field, field_validator

from ..errors import ExitStatus
from ..options import Strict

_LABEL = r"^[a-zA-Z_][a-zA-Z0-9_]*$"


class Command(StrEnum):
    """The commands that report their runs: each is a Pushgateway group and an MLflow run of its own."""

    FLEET = "fleet"
    TRAIN = "train-safety"
    EVAL = "eval"


class MetricsSection(Strict):
    """`metrics:`: push each run's metrics to a Prometheus Pushgateway, the batch-job way."""

    pushgateway: str = Field(description="the Pushgateway's URL, e.g. http://pushgateway.monitoring:9091")
    job: str = Field("safemerge-ray", description="the `job` label of every pushed series")
    grouping: dict[str, str] = Field({}, description="more grouping labels, e.g. {fleet: prod} (bounded: per "
                                                     "fleet, never per adapter)")
    per_adapter: bool = Field(False, description="also push one series per failed or held adapter (label "
                                                 "`adapter`): only for fleets of a bounded size")
    timeout_s: float = Field(10.0, gt=0, description="how long a push may take before it is given up (a warning)")

    @field_validator("pushgateway")
    @classmethod
    def _url(cls, v: str) -> str:
        if urlparse(v).scheme not in ("http", "https") or not urlparse(v).netloc:
            raise ValueError(f"expected an http(s) URL such as http://pushgateway:9091; got {v!r}")
        return v.rstrip("/")

    @field_validator("grouping")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        bad = [k for k in v if not re.match(_LABEL, k) or k in ("job", "command")]
        if bad:
            raise ValueError(f"label names must match {_LABEL} and not be job or command; got {bad}")
        return v


class TrackingSection(Strict):
    """`tracking:`: one MLflow run per fleet, train-safety and eval run (needs the `mlflow` extra)."""

    mlflow: str = Field(description="the MLflow tracking URI, e.g. http://mlflow.ml:5000")
    experiment: str = Field("safemerge-ray", description="the MLflow experiment the runs go to")
    timeout_s: float = Field(60.0, gt=0, description="how long logging a run may take before it is given up "
                                                     "(a warning)")


def add_service_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pushgateway", metavar="URL", default=None,
                        help="push this run's metrics to this Prometheus Pushgateway (overrides metrics.pushgateway)")
    parser.add_argument("--tracking-uri", metavar="URI", default=None,
                        help="log this run to this MLflow tracking server (overrides tracking.mlflow)")


def with_flags(metrics: MetricsSection | None, tracking: TrackingSection | None,
               args: argparse.Namespace) -> tuple[MetricsSection | None, TrackingSection | None]:
    """The config's sections with `--pushgateway` / `--tracking-uri` on top (checked as the file's are)."""
    from ..options import validate

    if getattr(args, "pushgateway", None):
        base = metrics.model_dump() if metrics else {}
        metrics = validate(MetricsSection, {**base, "pushgateway": args.pushgateway}, "--pushgateway")
    if getattr(args, "tracking_uri", None):
        base = tracking.model_dump() if tracking else {}
        tracking = validate(TrackingSection, {**base, "mlflow": args.tracking_uri}, "--tracking-uri")
    return metrics, tracking


@dataclass
class RunOutcome:
    """What a finished run (any outcome) reports: small and bounded, whatever the fleet's size."""

    command: Command
    started: float  # unix time
    exit_status: int
    ended: float = field(default_factory=time.time)
    run_id: str | None = None
    counts: dict[str, int] = field(default_factory=dict)  # adapters by outcome (fleet)
    adapters: dict[str, str] = field(default_factory=dict)  # adapter -> outcome, for per-adapter series
    phase_s: dict[str, float] = field(default_factory=dict)  # seconds per phase (fleet: plan, score, ...)
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        """The run did its job: everything done, or (fleet) a partial night whose failed and held adapters
        have alerts of their own. A failure never moves the last-success time."""
        ok = {ExitStatus.OK, ExitStatus.PARTIAL} if self.command == Command.FLEET else {ExitStatus.OK}
        return self.exit_status in ok


@dataclass
class TrackedRun:
    """One run as an experiment tracker records it."""

    command: Command
    outcome: RunOutcome
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    steps: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> (step, value), e.g. loss
    artifacts: dict[str, bytes] = field(default_factory=dict)  # file name -> bytes
