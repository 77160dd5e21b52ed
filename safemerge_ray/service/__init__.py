"""Running it as a service: metrics for Prometheus, runs for MLflow, and the hand-off to serving.

    sections  the `metrics:` and `tracking:` settings every command shares, and what a run reports
    metrics   a run's series, pushed to a Pushgateway (a warning, never a failed run, when it cannot be)
    tracking  a run in MLflow: parameters, metrics, tags and files
    notify    both, bounded in time, and the fleet's `on_publish` command
    export    published adapters materialised for serving, under versioned names
"""

from .export import ExportOutcome, ExportReport, export_published, open_target
from .metrics import push_metrics, registry_for
from .notify import CommandRun, Reported, report_run, reporting, run_on_publish
from .sections import (
    Command,
    MetricsSection,
    RunOutcome,
    TrackedRun,
    TrackingSection,
    add_service_flags,
    with_flags,
)
from .tracking import track_run

__all__ = [
    "Command", "CommandRun", "MetricsSection", "Reported", "RunOutcome", "TrackedRun", "TrackingSection",
    "add_service_flags", "push_metrics", "registry_for", "report_run", "reporting", "run_on_publish", "track_run",
    "with_flags",
    "ExportOutcome", "ExportReport", "export_published", "open_target",
]
