"""Cluster-safe inputs, honest exit status and run records, on a real local Ray and local store.

(The same paths across two `ray start` nodes and S3 are in test_z_cluster.py.)
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from safemerge_ray.cli import main
from safemerge_ray.cli.records import RECORD_LINE, find_record
from safemerge_ray.cli.submit import build_runtime_env
from safemerge_ray.errors import EnvironmentFailure, ExitStatus, SafeMergeError
from safemerge_ray.fleet import run_fleet
from safemerge_ray.fleet.config import load_config, parse_config, portable_config
from safemerge_ray.fleet.jobs import format_problems
from safemerge_ray.fleet.worker import FleetWorker
from safemerge_ray.io import LocalDir, S3Settings, is_hub_id, open_dir, resolve_location


@pytest.fixture
def fleet(local_fleet):
    return local_fleet


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize("location,kind", [
    ("meta-llama/Llama-2-7b-hf", "hub"),
    ("fleet/unaligned", "local"),  # `fleet` exists: a mistyped local path, not a hub id
    ("./org/name", "local"),
    ("~/models/base", "local"),
    ("/abs/models/base", "local"),
    ("models", "local"),
    ("s3://bucket/prefix/", "s3"),
])
def test_what_becomes_a_hub_lookup(tmp_path, location, kind):
    (tmp_path / "fleet").mkdir()
    resolved = resolve_location(location, tmp_path)
    if kind == "hub":
        assert resolved == f"hf://{location}" and is_hub_id(location)
        assert resolve_location(resolved, tmp_path / "elsewhere") == resolved  # not re-decided later
    elif kind == "s3":
        assert resolved == location
    else:
        assert Path(resolved).is_absolute() and "~" not in resolved


def test_prefixes_and_outputs_are_never_hub_ids(tmp_path):
    raw = {"unaligned_model": "u", "aligned_model": "a", "safety_adapter": "s", "output": "org/merged",
           "finetuned": [{"prefix": "org/domains"}]}
    config = parse_config(raw, base=tmp_path)
    assert config.output == str(tmp_path / "org" / "merged")
    assert config.finetuned[0].prefix == str(tmp_path / "org" / "domains")


def test_mistyped_local_path_is_not_a_hub_lookup(tmp_path, monkeypatch):
    (tmp_path / "fleet").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SafeMergeError, match=r"unaligned model: no such directory: .*/fleet/unaligend$"):
        open_dir("fleet/unaligend", what="unaligned model")


def test_config_paths_are_absolute_relative_to_the_config(fleet, tmp_path, monkeypatch):
    """`--config fleet/fleet.yaml` from the fleet's parent: every path absolute, under the config's dir."""
    monkeypatch.chdir(fleet.parent)
    config = load_config(Path(fleet.name) / "fleet.yaml")
    for path in (config.unaligned_model, config.aligned_model, config.safety_adapter, config.output):
        assert Path(path).is_absolute() and Path(path).parent == fleet, path
    assert all(Path(r.uri).is_absolute() for r in config.resolve_adapters())
    # What `submit` ships to the cluster: the same config with those absolute paths written in.
    _, text = portable_config(Path(fleet.name) / "fleet.yaml")
    raw = yaml.safe_load(text)
    assert raw["unaligned_model"] == str(fleet / "unaligned")
    assert raw["finetuned"] == [{"prefix": str(fleet / "finetuned")}]
    assert raw["merge"] == yaml.safe_load((fleet / "fleet.yaml").read_text())["merge"]


def test_config_has_no_place_for_credentials(fleet):
    raw = yaml.safe_load((fleet / "fleet.yaml").read_text())
    raw["s3"] = {"aws_secret_access_key": "hunter2"}
    (fleet / "fleet.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SafeMergeError, match="s3.aws_secret_access_key: Extra inputs are not permitted") as exc:
        load_config(fleet / "fleet.yaml")
    assert "hunter2" not in str(exc.value)


def test_output_inside_a_job_working_dir_copy_is_refused(fleet, ray_local):
    copy = fleet.parent / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    config = replace(load_config(fleet / "fleet.yaml"), output=str(copy / "merged"))
    with pytest.raises(SafeMergeError, match="inside Ray's temporary copy of the job's working dir"):
        run_fleet(config, progress=False)
    assert not (copy / "merged" / "runs").exists()


# --------------------------------------------------------------------------- preflight


def test_preflight_names_the_node_and_the_cause(fleet, ray_local):
    worker = FleetWorker(str(fleet / "unaligned"), str(fleet / "gone"), S3Settings(), "cpu")
    out = LocalDir(fleet / "merged")
    result = worker.preflight([str(fleet / "finetuned" / "gsm8k"), str(fleet / "finetuned" / "nope")],
                              str(fleet / "safety"), out, marker=(".preflight-x", "token"))
    node = result.node
    assert re.fullmatch(r"127\.0\.0\.1 \(node [0-9a-f]{8}\)|[\d.]+ \(node [0-9a-f]{8}\)", node)
    assert format_problems(result.problems) == [
        f"worker node {node} cannot read {fleet / 'gone'} (and 1 more): no such directory on that node; a "
        "multi-node cluster needs its inputs on S3 or a shared filesystem",
        f"worker node {node} does not see the output directory {out.uri}: the driver's marker file is not there; "
        "a multi-node cluster needs an s3:// output or a shared filesystem",
    ]
    # With the marker in place and every input there, nothing to report; headers are kept for scoring.
    out.write(".preflight-x", b"token")
    worker = FleetWorker(str(fleet / "unaligned"), str(fleet / "aligned"), S3Settings(), "cpu")
    ok = worker.preflight([str(fleet / "finetuned" / "gsm8k")], str(fleet / "safety"), out, (".preflight-x", "token"))
    # (the safety adapter's header too: scoring reads its layers for the repair's effect)
    assert ok.problems == [] and len(worker.models) == 2 and len(worker.adapters) == 2


def test_an_adapter_that_changed_since_planning_fails_alone_at_assembly(fleet):
    """A worker assembles from the header it holds; one that is not the header the driver planned (the
    adapter was replaced during the run) is that adapter's failure, not a wrong output."""
    from safemerge_ray.core import MergeSettings

    worker = FleetWorker(str(fleet / "unaligned"), str(fleet / "aligned"), S3Settings(), "cpu")
    result = worker.assemble("gsm8k", str(fleet / "finetuned" / "gsm8k"), "the fingerprint planned", None, {}, {},
                             MergeSettings(policy="safelora"), LocalDir(fleet / "merged"), "runs/x/gsm8k/")
    assert result.error is not None and result.error.reason == \
        "adapter gsm8k changed while this run repaired it; the next run repairs it"
    assert not (fleet / "merged" / "runs").exists()


def test_worker_constructor_never_touches_inputs(tmp_path):
    """A bad input must not look like a crashed actor to Ray (which would restart it)."""
    worker = FleetWorker("/no/such/model", "s3://no-such-bucket/x/", S3Settings(), "cuda")
    assert worker.models == {} and worker.adapters == {}


# --------------------------------------------------------------------------- exit status and records


def _record(fleet: Path) -> dict:
    return json.loads((fleet / "merged" / "status" / "last_run.json").read_text())


def test_unchanged_plus_one_broken_is_partial_not_failed(fleet, ray_local):
    config = load_config(fleet / "fleet.yaml")
    assert run_fleet(config, progress=False).exit_code == ExitStatus.OK
    (fleet / "finetuned" / "medqa" / "adapter_config.json").write_text("{not json")
    report = run_fleet(config, progress=False)
    assert report.by_status("unchanged") == ["gsm8k", "legal", "support"] and report.by_status("failed") == ["medqa"]
    assert report.exit_code == ExitStatus.PARTIAL and report.run_id is None  # nothing new to commit: no run dir
    record = _record(fleet)
    assert record["exit_status"] == ExitStatus.PARTIAL and record["run_id"] is None
    assert record["counts"] == {"adapters": 4, "committed": 0, "unchanged": 3, "held": 0, "failed": 1}
    assert "corrupt adapter_config.json" in record["failed"]["medqa"]
    # Every adapter broken: nothing usable.
    for name in ("gsm8k", "legal", "support"):
        (fleet / "finetuned" / name / "adapter_config.json").write_text("[]")
    assert run_fleet(config, progress=False).exit_code == ExitStatus.FAILED


def test_run_record_on_a_shared_input_error_and_summary_json(fleet, ray_local, tmp_path, capsys):
    shutil.rmtree(fleet / "aligned")
    summary = tmp_path / "reports" / "last.json"
    summary.parent.mkdir()
    code = main(["fleet", "--config", str(fleet / "fleet.yaml"), "--quiet", "--summary-json", str(summary),
                 "--record-line"])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.count("\n") == 1 and "aligned model: no such directory" in captured.err
    record = json.loads(summary.read_text())
    assert record == _record(fleet)
    assert record["exit_status"] == 2 and "aligned model: no such directory" in record["error"]
    assert record["started_at"] <= record["ended_at"] and record["tool_version"]
    (line,) = [x for x in captured.out.splitlines() if x.startswith(RECORD_LINE)]
    assert find_record(captured.out) == record == json.loads(line[len(RECORD_LINE):])


def test_summary_json_for_a_config_that_does_not_load(tmp_path, capsys):
    summary = tmp_path / "s.json"
    assert main(["fleet", "--config", str(tmp_path / "missing.yaml"), "--summary-json", str(summary)]) == 2
    record = json.loads(summary.read_text())
    assert record["exit_status"] == 2 and "config file not found" in record["error"] and record["run_id"] is None


def test_environment_failures_exit_1(tmp_path, capsys, monkeypatch):
    from safemerge_ray.cli import fleet as cli

    def no_credentials(args):
        raise EnvironmentFailure("worker node 10.0.0.5 (node 3f2a9c1b) cannot read s3://m/: no AWS credentials")

    monkeypatch.setattr(cli, "cmd_fleet", no_credentials)
    assert main(["fleet", "--config", "x.yaml"]) == 1
    assert capsys.readouterr().err.strip().endswith("no AWS credentials")


# --------------------------------------------------------------------------- submit


def test_submit_runtime_env_and_record_parsing(tmp_path):
    env = build_runtime_env(str(tmp_path), {"env_vars": {"A": "1"}, "pip": ["x"]})
    assert env["working_dir"] == str(tmp_path) and env["env_vars"] == {"A": "1"} and env["pip"] == ["x"]
    assert Path(env["py_modules"][0]).name == "safemerge_ray"
    with pytest.raises(SafeMergeError, match="working_dir is set by submit"):
        build_runtime_env(str(tmp_path), {"working_dir": "."})
    log = f"progress\n{RECORD_LINE}{{\"exit_status\": 4}}\nnoise\n{RECORD_LINE}{{\"exit_status\": 3}}\n"
    assert find_record(log) == {"exit_status": 3}
    assert find_record("no record here\n") is None


def test_submit_user_errors_are_one_line(fleet, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SAFEMERGE_NOT_SET", raising=False)
    assert main(["submit", "--config", str(fleet / "fleet.yaml"), "--env", "SAFEMERGE_NOT_SET"]) == 2
    assert "--env: SAFEMERGE_NOT_SET not set in this shell" in capsys.readouterr().err
    assert main(["submit", "--config", str(fleet / "fleet.yaml"), "--runtime-env-json", "{nope"]) == 2
    assert "--runtime-env-json: not valid JSON" in capsys.readouterr().err
    # A bad config fails before anything is submitted (no cluster is needed to see that).
    (fleet / "fleet.yaml").write_text("output: 3\n")
    assert main(["submit", "--config", str(fleet / "fleet.yaml"), "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "invalid config" in err and "Traceback" not in err


def test_submit_to_nothing_is_an_environment_error(fleet, capsys):
    from raycluster import free_port

    code = main(["submit", "--config", str(fleet / "fleet.yaml"), "--address", f"http://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot reach the Ray job API at http://127.0.0.1:" in err and "Traceback" not in err


def test_sigterm_ends_a_run_with_a_record(fleet, tmp_path):
    """`ray job stop` and an evicted pod send SIGTERM: the run says so in its record (130), commits nothing."""
    import signal
    import subprocess
    import sys
    import time

    cli = Path(sys.executable).with_name("safemerge-ray")
    proc = subprocess.Popen([str(cli), "fleet", "--config", str(fleet / "fleet.yaml"), "--address", "local"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        seen = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            if "starting" in line or not line:
                break
        assert any("starting" in line for line in seen), "".join(seen)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 130, "".join(seen) + out
    assert "Traceback" not in out
    record = _record(fleet)
    assert record["exit_status"] == 130 and record["run_id"] is None and "interrupted" in record["error"]
    assert not (fleet / "merged" / "latest").exists()


def test_exit_status_counts_the_whole_fleet():
    from safemerge_ray.core import MergeSettings
    from safemerge_ray.fleet import AdapterState, exit_status
    from safemerge_ray.fleet.config import AdapterRef
    from safemerge_ray.fleet.jobs import Failure

    def state(status: str, failure: Failure | None = None) -> AdapterState:
        st = AdapterState(AdapterRef(status, f"/x/{status}"), MergeSettings(), status=status)
        if failure:
            st.fail(failure)
        return st

    bad, outage = Failure("corrupt adapter_config.json"), Failure("S3 error: cannot connect", environment=True)
    assert exit_status([state("committed"), state("unchanged")]) == 0
    assert exit_status([state("unchanged")] * 12 + [state("x", bad)]) == 3
    assert exit_status([state("unchanged"), state("x", outage)]) == 3
    assert exit_status([state("x", bad), state("y", outage)]) == 4
    assert exit_status([state("x", outage), state("y", outage)]) == 1  # the store, not the adapters
    assert Failure.of(EnvironmentFailure("S3 down")).environment and not Failure.of(SafeMergeError("bad")).environment
    assert Failure.of(OSError(28, "No space left on device")).environment
