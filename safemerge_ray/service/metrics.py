"""A run's series, pushed to a Prometheus Pushgateway: the batch-job way (a job that ends cannot be scraped).

Every run pushes, whatever its outcome. The push adds (POST) rather than replaces: the last-success time is
pushed only by a run that succeeded, so a failed night leaves the last good night's value in place, which is
what the "no successful run for 26 h" alert reads (infra/prometheus/safemerge-alerts.yaml)."""

from __future__ import annotations

from .sections import Command, MetricsSection, RunOutcome

PREFIX = "safemerge_run_"
OUTCOMES = ("committed", "unchanged", "held", "failed")  # the fleet's adapters by outcome, always all four


def registry_for(outcome: RunOutcome, per_adapter: bool = False):
    """The run's series in a registry of their own (never the process's default one)."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()

    def gauge(name: str, help: str, value: float) -> None:
        Gauge(PREFIX + name, help, registry=registry).set(value)

    gauge("start_time_seconds", "When the last run started (unix time).", outcome.started)
    gauge("duration_seconds", "How long the last run took.", max(0.0, outcome.ended - outcome.started))
    gauge("exit_status", "The last run's exit status (0 done, 1 environment, 2 usage, 3 partial, 4 nothing "
                         "usable, 5 locked, 130 interrupted).", outcome.exit_status)
    gauge("succeeded", "1 if the last run did its job (fleet: exit status 0 or 3), else 0.",
          1.0 if outcome.succeeded else 0.0)
    if outcome.succeeded:
        gauge("last_success_time_seconds", "When the last successful run ended (unix time).", outcome.ended)
    if outcome.command == Command.FLEET:
        adapters = Gauge(PREFIX + "adapters", "The last run's adapters by outcome.", ["outcome"], registry=registry)
        for name in OUTCOMES:
            adapters.labels(outcome=name).set(outcome.counts.get(name, 0))
    if outcome.phase_s:
        phases = Gauge(PREFIX + "phase_seconds", "How long each phase of the last run took (fleet: plan, ray, "
                       "preflight, score, assemble, gate, commit).", ["phase"], registry=registry)
        for phase, seconds in outcome.phase_s.items():
            phases.labels(phase=phase).set(seconds)
    if per_adapter and outcome.adapters:
        each = Gauge("safemerge_adapter_outcome", "1 for each adapter the last run failed or held back.",
                     ["adapter", "outcome"], registry=registry)
        for adapter, state in sorted(outcome.adapters.items()):
            each.labels(adapter=adapter, outcome=state).set(1)
    return registry


def grouping_key(section: MetricsSection, command: Command) -> dict[str, str]:
    return {"command": str(command), **section.grouping}


def push_metrics(section: MetricsSection, outcome: RunOutcome) -> None:
    """Push the run's series (raises OSError and friends when the gateway cannot be reached: see notify)."""
    from prometheus_client import pushadd_to_gateway

    pushadd_to_gateway(section.pushgateway, job=section.job, registry=registry_for(outcome, section.per_adapter),
                       grouping_key=grouping_key(section, outcome.command),
                       timeout=section.timeout_s + 1)  # past notify's bound: a hang reads the same every time
