"""infra/prometheus/: the alerts on safemerge-ray's run metrics, checked with promtool.

`promtool check rules` and `promtool test rules` (Debian's `prometheus` package, `make prometheus-tools`) run on
the rules file and its unit tests (safemerge-alerts.test.yaml: each alert firing and not firing); a deliberately
broken copy of the rules must fail those tests, so they can fail. The PrometheusRule of k8s/components/monitoring
carries exactly the rules file's groups. The rules read only series the code pushes (safemerge_ray/service/
metrics.py), and they fire as intended on what a real Pushgateway exposes after a good night and a failed one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS = REPO / "infra" / "prometheus"
RULES = PROMETHEUS / "safemerge-alerts.yaml"
RULE_TESTS = PROMETHEUS / "safemerge-alerts.test.yaml"
PROMETHEUS_RULE = REPO / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"
ALERTS = ("SafeMergeRunFailed", "SafeMergeNoRecentSuccess", "SafeMergeAdaptersHeld", "SafeMergeAdaptersFailed")


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        message = "promtool not found (Debian's `prometheus` package: make prometheus-tools)"
        if os.environ.get("CI"):  # CI installs every tool: a missing one is a failure there
            pytest.fail(message)
        pytest.skip(message)
    return promtool


def _run_promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess:
    return subprocess.run([_promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


# --------------------------------------------------------------------------- promtool


def test_rules_pass_promtool_check():
    proc = _run_promtool("check", "rules", RULES.name)
    assert proc.returncode == 0, f"promtool check rules {RULES.name}:\n{proc.stdout}{proc.stderr}"
    assert {rule["alert"] for rule in _rules()} == set(ALERTS)


def test_rules_pass_their_unit_tests():
    proc = _run_promtool("test", "rules", RULE_TESTS.name)
    assert proc.returncode == 0, f"promtool test rules {RULE_TESTS.name}:\n{proc.stdout}{proc.stderr}"


def test_the_unit_tests_cover_each_alert_firing_and_not():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    checks = [c for test in tests for c in test.get("alert_rule_test", [])]
    for alert in ALERTS:
        ours = [c for c in checks if c["alertname"] == alert]
        assert any(c.get("exp_alerts") for c in ours), f"no test where {alert} fires"
        assert any(not c.get("exp_alerts") for c in ours), f"no test where {alert} stays quiet"
    reasons = {a["exp_labels"].get("reason") for c in checks for a in c.get("exp_alerts") or []}
    assert {"stale", "never-succeeded"} <= reasons


BREAKAGES = [  # (the alert whose tests must fail, what in the rules file, replaced by what)
    ("SafeMergeAdaptersHeld", 'adapters{outcome="held"} > 0', 'adapters{outcome="held"} > 2'),
    ("SafeMergeAdaptersFailed", 'adapters{outcome="failed"} > 0', 'adapters{outcome="held"} > 0'),
    ("SafeMergeRunFailed", "safemerge_run_exit_status and safemerge_run_succeeded == 0",
     "safemerge_run_exit_status != 0"),  # a partial fleet night (3) is no failed run
    ("SafeMergeNoRecentSuccess", "> 26 * 3600  # SCHEDULE", "> 28 * 3600  # SCHEDULE"),
    ("SafeMergeNoRecentSuccess", "for: 26h  # SCHEDULE", "for: 20h  # SCHEDULE"),
    ("SafeMergeNoRecentSuccess", '\n          or absent(safemerge_run_start_time_seconds{command="fleet"})', ""),
    ("SafeMergeNoRecentSuccess", "safemerge_run_last_success_time_seconds{command=\"fleet\"})",
     "safemerge_run_succeeded{command=\"fleet\"})"),
]


@pytest.mark.parametrize("alert,old,new", BREAKAGES, ids=[f"{a}:{new or 'removed'}" for a, _, new in BREAKAGES])
def test_a_broken_rule_fails_the_unit_tests(tmp_path, alert, old, new):
    """The unit tests notice a changed threshold, label, expression or `for:`: a copy of the rules broken once
    fails `promtool test rules` on that alert, though it still passes `promtool check rules`."""
    text = RULES.read_text()
    assert text.count(old) == 1, f"{old!r} is no longer in {RULES.name} exactly once: update this breakage"
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    (tmp_path / RULES.name).write_text(text.replace(old, new))
    assert _run_promtool("check", "rules", RULES.name, cwd=tmp_path).returncode == 0, "the breakage must be valid"
    proc = _run_promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert proc.returncode != 0, f"promtool test rules passed with {old!r} -> {new!r}:\n{proc.stdout}"
    assert f"alertname: {alert}" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- the PrometheusRule


def test_the_prometheusrule_carries_the_rules_file_groups():
    """kustomize cannot read infra/ from k8s/ (nor generate a custom kind), so the two copies are compared."""
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], (
        f"{PROMETHEUS_RULE.relative_to(REPO)} spec.groups differ from {RULES.relative_to(REPO)}: edit both")
    kustomization = yaml.safe_load((PROMETHEUS_RULE.parent / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Component" and PROMETHEUS_RULE.name in kustomization["resources"]


# --------------------------------------------------------------------------- the rules and the code


def _selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, equality matchers) of every `safemerge_...` selector in a PromQL expression."""
    found = []
    for name, matchers in re.findall(r"\b(safemerge_\w+)(?:\{([^}]*)\})?", expr):
        found.append((name, dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', matchers or ""))))
    return found


def _pushed() -> dict[str, set[str]]:
    """Each series name the code pushes (a fleet run with every kind of outcome, per-adapter series on) -> its
    label names."""
    from safemerge_ray.service.metrics import registry_for
    from safemerge_ray.service.sections import Command, RunOutcome

    outcome = RunOutcome(Command.FLEET, started=0.0, exit_status=3, ended=60.0,
                         counts={"committed": 1, "held": 1, "failed": 1}, adapters={"a": "held", "b": "failed"})
    return {sample.name: set(sample.labels) for family in registry_for(outcome, per_adapter=True).collect()
            for sample in family.samples}


def test_the_rules_read_only_series_the_code_pushes():
    from safemerge_ray.service.metrics import OUTCOMES
    from safemerge_ray.service.sections import Command

    pushed = _pushed()
    values = {"command": {str(c) for c in Command}, "outcome": set(OUTCOMES)}
    for rule in _rules():
        for name, matchers in _selectors(rule["expr"]):
            assert name in pushed, f"{rule['alert']} reads {name}, which no run pushes ({sorted(pushed)})"
            for label, value in matchers.items():
                assert label in pushed[name] | {"job", "command"}, f"{rule['alert']}: {name} has no label {label}"
                assert value in values.get(label, {value}), f"{rule['alert']}: no run pushes {label}={value!r}"
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:  # the unit tests' inputs are pushed series too
        for series in test["input_series"]:
            name = series["series"].split("{")[0]
            assert name in pushed, f"{RULE_TESTS.name} ({test['name']}) feeds {name}, which no run pushes"


# --------------------------------------------------------------------------- on a real Pushgateway

DAY_SAMPLES = 144  # one day of 10-minute scrapes


def _scrape(gateway: str, job: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The group's series as Prometheus stores them when it scrapes the Pushgateway with honor_labels: true (the
    labels as pushed; an empty label, instance="", is no label)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{gateway}/metrics", timeout=10) as response:
        text = response.read().decode()
    series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("safemerge_") and sample.labels.get("job") == job:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if v))
                series[sample.name, labels] = sample.value
    return series


def _selector(name: str, labels) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(dict(labels).items())) + "}"


def test_the_alerts_fire_on_what_a_real_pushgateway_exposes(pushgateway, tmp_path):
    """A good fleet night ending at 0, then a failed one (exit status 1) at 24 h, pushed with the code's own push
    (POST) to a real Pushgateway and scraped after each: the failed night keeps the good night's last-success time,
    so SafeMergeRunFailed fires at once and SafeMergeNoRecentSuccess only past 26 h; the labels are the pushed
    ones (job, command, the grouping's fleet)."""
    from safemerge_ray.service.metrics import push_metrics
    from safemerge_ray.service.sections import Command, MetricsSection, RunOutcome

    job = "safemerge-alerts-test"  # a group of its own on the session's Pushgateway
    section = MetricsSection(pushgateway=pushgateway, job=job, grouping={"fleet": "alerts"})
    try:
        push_metrics(section, RunOutcome(Command.FLEET, started=-1800.0, exit_status=0, ended=0.0,
                                         counts={"committed": 3, "unchanged": 5}))
        good = _scrape(pushgateway, job)
        push_metrics(section, RunOutcome(Command.FLEET, started=84600.0, exit_status=1, ended=86400.0))
        failed = _scrape(pushgateway, job)
    finally:
        request = urllib.request.Request(f"{pushgateway}/metrics/job/{job}/command/fleet/fleet/alerts",
                                         method="DELETE")
        urllib.request.urlopen(request, timeout=10).close()
    last_success = [k for k in failed if k[0] == "safemerge_run_last_success_time_seconds"]
    assert last_success and failed[last_success[0]] == good[last_success[0]] == 0.0, "the failed push moved it"

    def values(key) -> str:
        before, after = good.get(key), failed.get(key)
        return (f"{'_' if before is None else repr(before)}x{DAY_SAMPLES - 1} "
                f"{'_' if after is None else repr(after)}x40")

    (status_key,) = [k for k in failed if k[0] == "safemerge_run_exit_status"]
    group = dict(status_key[1])
    assert group == {"job": job, "command": "fleet", "fleet": "alerts"}, group

    def firing(alert: str, **labels: str) -> dict:
        return {"labels": _selector("ALERTS", {"alertname": alert, "alertstate": "firing", **group, **labels}),
                "value": 1}

    unit_tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "5m",
        "tests": [{
            "name": "a good night, then a failed one, as pushed to and scraped from a Pushgateway",
            "interval": "10m",
            "input_series": [{"series": _selector(*key), "values": values(key)}
                             for key in sorted(set(good) | set(failed))],
            "promql_expr_test": [
                {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "23h50m", "exp_samples": []},
                {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "24h10m",
                 "exp_samples": [firing("SafeMergeRunFailed", severity="warning")]},
                {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "27h",
                 "exp_samples": [firing("SafeMergeRunFailed", severity="warning"),
                                 firing("SafeMergeNoRecentSuccess", severity="critical", reason="stale")]},
            ],
        }],
    }
    (tmp_path / "scraped.test.yaml").write_text(yaml.safe_dump(unit_tests, sort_keys=False))
    proc = _run_promtool("test", "rules", "scraped.test.yaml", cwd=tmp_path)
    assert proc.returncode == 0, f"promtool test rules on the scraped series:\n{proc.stdout}{proc.stderr}"
