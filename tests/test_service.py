"""Run it like a service: every run's metrics reach a real Pushgateway (scraped back here), every run is tracked
in a real MLflow server (read back through MLflow's client), `on_publish` hands the run record on, and none of
them can fail a run when its server is away."""

from __future__ import annotations

import json
import socket
import sys
import time

import pytest
import yaml

from safemerge_ray.cli import main
from safemerge_ray.errors import ExitStatus, SafeMergeError
from safemerge_ray.fleet import load_config, run_fleet
from safemerge_ray.io import open_dir
from safemerge_ray.service import Command, RunOutcome, registry_for
from safemerge_ray.store import LockHeld, RunLock
from services import scrape


def _config(root, **sections) -> str:
    raw = yaml.safe_load((root / "fleet.yaml").read_text())
    raw.update(sections)
    path = root / "service.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _series(metrics: dict, name: str, **labels) -> float | None:
    for (series, have), value in metrics.items():
        if series == name and set(labels.items()) <= set(have):
            return value
    return None


# --------------------------------------------------------------------------- what a run pushes, without a gateway

def _names(outcome: RunOutcome, per_adapter: bool = False) -> dict[str, float]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(registry_for(outcome, per_adapter)).decode()
    return {s.name + json.dumps(s.labels, sort_keys=True): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_only_a_run_that_succeeded_pushes_the_last_success_time():
    good = _names(RunOutcome(Command.FLEET, 100.0, ExitStatus.PARTIAL, ended=160.0, counts={"held": 1}))
    assert good['safemerge_run_last_success_time_seconds{}'] == 160.0 and good["safemerge_run_succeeded{}"] == 1
    assert good['safemerge_run_adapters{"outcome": "held"}'] == 1
    assert good['safemerge_run_adapters{"outcome": "committed"}'] == 0  # every outcome, always
    bad = _names(RunOutcome(Command.FLEET, 100.0, ExitStatus.LOCKED, ended=101.0))
    assert not any(k.startswith("safemerge_run_last_success") for k in bad)
    assert bad["safemerge_run_succeeded{}"] == 0 and bad["safemerge_run_exit_status{}"] == 5
    training = _names(RunOutcome(Command.TRAIN, 100.0, ExitStatus.PARTIAL))  # only the fleet has a partial success
    assert training["safemerge_run_succeeded{}"] == 0 and not any("adapters" in k for k in training)


def test_per_adapter_series_only_when_asked():
    outcome = RunOutcome(Command.FLEET, 1.0, ExitStatus.PARTIAL, adapters={"legal": "held"})
    assert not any(k.startswith("safemerge_adapter_") for k in _names(outcome))
    assert _names(outcome, per_adapter=True)['safemerge_adapter_outcome{"adapter": "legal", "outcome": "held"}'] == 1


@pytest.mark.parametrize("section, message", [
    ({"pushgateway": "pushgateway:9091"}, "expected an http(s) URL"),
    ({"pushgateway": "http://gw:9091", "grouping": {"job": "x"}}, "not be job or command"),
    ({"pushgateway": "http://gw:9091", "per_adapter": "yes please"}, "per_adapter"),
])
def test_bad_metrics_sections_are_one_line_errors(local_fleet, section, message, capsys):
    assert main(["fleet", "--config", _config(local_fleet, metrics=section), "--dry-run"]) == ExitStatus.USAGE
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "metrics" in err


# --------------------------------------------------------------------------- a real Pushgateway

def test_committed_idle_failed_and_locked_nights_as_scraped(local_fleet, pushgateway, ray_local):
    grouping = {"fleet": "nights"}
    config = load_config(_config(local_fleet, metrics={"pushgateway": pushgateway, "grouping": grouping}))
    first = run_fleet(config, progress=False)
    assert first.exit_code == ExitStatus.OK and not first.record.warnings
    scraped = scrape(pushgateway)
    labels = {"job": "safemerge-ray", "command": "fleet", "fleet": "nights"}
    assert _series(scraped, "safemerge_run_exit_status", **labels) == 0
    assert _series(scraped, "safemerge_run_adapters", outcome="committed", **labels) == 4
    assert _series(scraped, "safemerge_run_adapters", outcome="failed", **labels) == 0
    first_success = _series(scraped, "safemerge_run_last_success_time_seconds", **labels)
    assert first_success and abs(first_success - time.time()) < 120
    assert _series(scraped, "safemerge_run_duration_seconds", **labels) > 0
    phases = first.record.phase_s
    assert _series(scraped, "safemerge_run_phase_seconds", phase="score", **labels) == phases["score"] > 0
    assert _series(scraped, "safemerge_run_phase_seconds", phase="commit", **labels) == phases["commit"]

    time.sleep(1.1)
    idle = run_fleet(config, progress=False)  # nothing to do is a successful night too
    scraped = scrape(pushgateway)
    assert idle.exit_code == 0 and _series(scraped, "safemerge_run_adapters", outcome="unchanged", **labels) == 4
    last_good = _series(scraped, "safemerge_run_last_success_time_seconds", **labels)
    assert last_good > first_success

    held = RunLock(open_dir(config.output, what="output", must_exist=False)).acquire()  # another run's lock
    try:
        with pytest.raises(LockHeld):
            run_fleet(config, progress=False)
    finally:
        held.release()
    scraped = scrape(pushgateway)
    assert _series(scraped, "safemerge_run_exit_status", **labels) == ExitStatus.LOCKED
    assert _series(scraped, "safemerge_run_succeeded", **labels) == 0
    assert _series(scraped, "safemerge_run_last_success_time_seconds", **labels) == last_good  # not hidden

    (local_fleet / "aligned" / "model.safetensors").write_bytes(b"damaged")  # a failed night
    with pytest.raises(SafeMergeError):
        run_fleet(config, progress=False)
    scraped = scrape(pushgateway)
    assert _series(scraped, "safemerge_run_exit_status", **labels) not in (0, 3, 5)
    assert _series(scraped, "safemerge_run_succeeded", **labels) == 0
    assert _series(scraped, "safemerge_run_last_success_time_seconds", **labels) == last_good


def _silent_port() -> socket.socket:
    """A port that accepts connections and never answers: a gateway that hangs."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


def test_an_unreachable_or_hung_gateway_is_a_warning_not_a_failure(local_fleet, ray_local):
    from services import free_port

    hung = _silent_port()
    try:
        for url, timeout in ((f"http://127.0.0.1:{free_port()}", 10), (f"http://127.0.0.1:{hung.getsockname()[1]}", 2)):
            config = load_config(_config(local_fleet, metrics={"pushgateway": url, "timeout_s": timeout}))
            started = time.monotonic()
            report = run_fleet(config, progress=False)
            assert report.exit_code == ExitStatus.OK
            warning = [w for w in report.record.warnings if w.startswith("metrics: not pushed")]
            assert warning, report.record.warnings
            assert time.monotonic() - started < 120
        stored = json.loads((local_fleet / "merged" / "status" / "last_run.json").read_text())
        assert any("no answer within 2 s" in w for w in stored["warnings"])  # the record says so
    finally:
        hung.close()


# --------------------------------------------------------------------------- on_publish

def test_on_publish_gets_the_record_and_its_failure_is_reported_not_unpublished(local_fleet, ray_local, tmp_path):
    got = tmp_path / "record.json"
    hook = [sys.executable, "-c", f"import sys, pathlib; pathlib.Path({str(got)!r}).write_text(sys.stdin.read())"]
    report = run_fleet(load_config(_config(local_fleet, on_publish=hook)), progress=False)
    record = json.loads(got.read_text())
    assert report.exit_code == 0 and record["run_id"] == report.run_id and record["counts"]["committed"] == 4

    failing = "echo 'reload refused' >&2; exit 7"
    merge = {"policy": "safemerge", "tau": 0.3, "weights": [0.8, 0.2]}  # new settings: every adapter is redone
    report = run_fleet(load_config(_config(local_fleet, on_publish=failing, merge=merge)), progress=False)
    assert report.exit_code == ExitStatus.ENVIRONMENT
    assert any(w == "on_publish: sh exited with status 7: reload refused" for w in report.record.warnings)
    pointer = json.loads((local_fleet / "merged" / "latest" / "legal.json").read_text())
    assert pointer["run_id"] == report.run_id  # published all the same


# --------------------------------------------------------------------------- a real MLflow server

def test_a_fleet_run_is_tracked_in_mlflow(local_fleet, mlflow_server, ray_local, capsys):
    from mlflow.tracking import MlflowClient

    path = _config(local_fleet, tracking={"mlflow": mlflow_server, "experiment": "fleet-nights"})
    config = load_config(path)
    assert main(["fleet", "--config", path, "--quiet", "--log-format", "text"]) == 0
    record = json.loads((local_fleet / "merged" / "status" / "last_run.json").read_text())
    assert not record["warnings"]
    client = MlflowClient(tracking_uri=mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("fleet-nights").experiment_id])
    out = capsys.readouterr().out
    assert f"tracking: MLflow run {run.info.run_id} in experiment 'fleet-nights'" in out
    assert "View run" not in out  # MLflow's own line on stdout, which a JSON log would not survive
    assert run.info.run_id == record["tracked_run"] and run.info.status == "FINISHED"
    assert run.data.tags["safemerge.run_id"] == record["run_id"] and run.data.tags["safemerge.exit_status"] == "0"
    assert run.data.params["merge.policy"] == "safemerge" and run.data.params["merge.tau"] == str(config.merge.tau)
    assert len(run.data.params["input.safety_adapter.fingerprint"]) == 64
    assert run.data.metrics["adapters.committed"] == 4
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("phase_s.")} == \
        {f"phase_s.{phase}": s for phase, s in record["phase_s"].items()}
    summary = json.loads((local_fleet / "merged" / "runs" / record["run_id"] / "summary.json").read_text())
    for name, entry in summary["adapters"].items():
        assert run.data.metrics[f"{name}.layers_repaired"] == entry["counts"]["repaired"]
        assert run.data.metrics[f"{name}.rho_min"] <= run.data.metrics[f"{name}.rho_mean"]
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "manifest.json", "last_run.json"} <= files
    local = client.download_artifacts(run.info.run_id, "summary.json")
    assert json.loads(open(local).read()) == summary


def test_train_and_eval_push_and_track_through_their_flags(local_fleet, pushgateway, mlflow_server, ray_local,
                                                           tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from safemerge_ray.synthetic import write_loop_data

    data = write_loop_data(local_fleet)
    flags = ["--pushgateway", pushgateway, "--tracking-uri", mlflow_server, "--quiet"]
    assert main(["train-safety", "--aligned-model", str(local_fleet / "aligned"), "--data", str(data["safety_data"]),
                 "--output", str(tmp_path / "safety"), "--workers", "1", "--max-steps", "4", "--save-steps", "4",
                 *flags]) == 0
    assert main(["fleet", "--config", str(local_fleet / "fleet.yaml"), "--quiet"]) == 0
    monkeypatch.chdir(local_fleet)
    assert main(["eval", "--fleet-output", "merged", "--harmful-prompts", "data/harmful.txt", "--limit", "3",
                 "--max-new-tokens", "4", "--output", str(tmp_path / "ev"), *flags]) == 0
    scraped = scrape(pushgateway)
    for command in ("train-safety", "eval"):
        assert _series(scraped, "safemerge_run_succeeded", command=command) == 1
        assert _series(scraped, "safemerge_run_last_success_time_seconds", command=command) > 0
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = {r.data.tags["safemerge.command"]: r
            for r in client.search_runs([client.get_experiment_by_name("safemerge-ray").experiment_id])}
    losses = client.get_metric_history(runs["train-safety"].info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    assert "manifest.json" in {f.path for f in client.list_artifacts(runs["train-safety"].info.run_id)}
    assert {"aligned.harmful_rate", "legal.repaired.harmful_rate"} <= set(runs["eval"].data.metrics)
