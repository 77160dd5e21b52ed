"""Faults on real parts: workers and drivers killed at a known point of a run, through a fault-injecting proxy.

The fleet reads and writes SeaweedFS through `FaultProxy` (tests/faultproxy.py), which holds a chosen
request, so a kill lands at a known point of the run (mid-score, mid-assembly, between the adapters and
the manifest). After every fault the output is checked the way a consumer would use it: every `latest/`
pointer verifies, and the published bytes equal an undisturbed run's. S3 errors, resets and outages are in
test_faults_s3.py; the proxy's own test is in test_faults_proxy.py.

Every wait is bounded, and only processes these tests started are killed, by PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from faultfleet import (
    BUCKET,
    NAMES,
    RUN_TIMEOUT_S,
    key_of,
    output_uri,
    pointer_runs,
    published_bytes,
    run_in_thread,
    tensor_read_matcher,
    verify_output,
    write_fleet_yaml,
)
from faultproxy import FaultProxy
from safemerge_ray.cli import main
from safemerge_ray.errors import ExitStatus
from safemerge_ray.fleet import run_fleet
from safemerge_ray.fleet.config import load_config
from safemerge_ray.store import LOCK

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- helpers


def _worker_processes() -> list[psutil.Process]:
    """FleetWorker actor processes of this session's in-process Ray (descendants of this process)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "FleetWorker" in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _worker_with_connection(peer: tuple[str, int]) -> psutil.Process:
    """The FleetWorker process whose TCP connection has local address `peer` (the proxy's client)."""
    for p in _worker_processes():
        try:
            if any(c.laddr and c.laddr.port == peer[1] for c in p.net_connections(kind="tcp")):
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no FleetWorker process holds the connection from {peer}: "
                         f"{[(p.pid, p.cmdline()) for p in _worker_processes()]}")


def _kill_worker_holding(proxy: FaultProxy, match, what: str) -> int:
    """SIGKILL the worker whose request matching `match` the proxy holds; returns its PID."""
    assert proxy.wait_for(match, timeout=60), f"no {what} request reached the proxy: {proxy.seen[-10:]}"
    peer = proxy.peer_of(match)
    assert peer is not None
    worker = _worker_with_connection(peer)
    pid = worker.pid
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    return pid


# --------------------------------------------------------------------------- killed workers


def test_worker_killed_mid_score(s3_inputs, s3_endpoint, s3_client, undisturbed, tmp_path, ray_local, monkeypatch,
                                 capsys):
    """A worker SIGKILLed while its tensor read is in flight: Ray restarts it, retries its scoring, and
    the run commits every adapter with the bytes of an undisturbed run."""
    output = output_uri(s3_inputs, "score")
    tensor_read = tensor_read_matcher(s3_inputs)

    with FaultProxy(s3_endpoint) as proxy:
        config = load_config(write_fleet_yaml(tmp_path / "fleet.yaml", s3_inputs, proxy.endpoint, output))
        gate = proxy.hold(tensor_read)
        running = run_in_thread(config)
        try:
            killed = _kill_worker_holding(proxy, tensor_read, "tensor read")
        finally:
            gate.set()
        report = running.result(timeout=RUN_TIMEOUT_S)
    assert report.exit_code == ExitStatus.OK, [(st.ref.name, st.reason) for st in report.adapters]
    assert report.by_status("committed") == NAMES
    assert killed not in {p.pid for p in _worker_processes()}
    assert set(pointer_runs(s3_client, output).values()) == {report.run_id}
    assert published_bytes(s3_client, output) == undisturbed
    verify_output(output, s3_endpoint, monkeypatch, capsys)


def test_worker_killed_mid_assembly(s3_inputs, s3_endpoint, s3_client, undisturbed, tmp_path, ray_local,
                                    monkeypatch, capsys):
    """A worker SIGKILLed while it writes an adapter: its assembly is retried on the restarted worker."""
    output = output_uri(s3_inputs, "asm")
    adapter_put = rf"^PUT /{BUCKET}/{key_of(output)}runs/[^/]+/[a-z0-9]+/adapter_model\.safetensors"
    with FaultProxy(s3_endpoint) as proxy:
        config = load_config(write_fleet_yaml(tmp_path / "fleet.yaml", s3_inputs, proxy.endpoint, output))
        gate = proxy.hold(adapter_put)
        running = run_in_thread(config)
        try:
            _kill_worker_holding(proxy, adapter_put, "adapter PUT")
        finally:
            gate.set()
        report = running.result(timeout=RUN_TIMEOUT_S)
    assert report.exit_code == ExitStatus.OK, [(st.ref.name, st.reason) for st in report.adapters]
    assert report.by_status("committed") == NAMES
    assert set(pointer_runs(s3_client, output).values()) == {report.run_id}
    assert published_bytes(s3_client, output) == undisturbed
    verify_output(output, s3_endpoint, monkeypatch, capsys)


# --------------------------------------------------------------------------- a killed driver


def _kill_driver(driver: subprocess.Popen) -> None:
    """SIGKILL the driver's process group (start_new_session: only what it started), then wait for Ray to
    end the dead job's FleetWorker actors (children of this session's raylet), bounded."""
    workers = _worker_processes()
    try:
        os.killpg(driver.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    driver.wait(timeout=20)
    _, alive = psutil.wait_procs(workers, timeout=30)
    for p in alive:  # Ray did not end them: end them here (they are this session's), and fail below
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    assert not alive, f"the killed driver's workers outlived it by 30 s: {[p.pid for p in alive]}"


def _driver_killed_at(proxy: FaultProxy, request: str, config, ray_local, cwd) -> subprocess.Popen:
    """A fleet driver started on this session's Ray (as a job's driver joins its cluster), SIGKILLed once `request`
    reaches the proxy, which holds it: the request is never forwarded."""
    gate = proxy.hold(request)
    env = os.environ | {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    log_path = cwd / "driver.log"
    with open(log_path, "wb") as log:
        driver = subprocess.Popen([sys.executable, "-m", "safemerge_ray", "fleet", "--config", str(config),
                                   "--quiet"], stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (held := proxy.wait_for(request, timeout=1)) and driver.poll() is None \
                and time.monotonic() < deadline:
            pass
        assert held, f"the driver never reached {request} (exit {driver.poll()}):\n" + \
            log_path.read_text(errors="replace")[-3000:]
    finally:
        _kill_driver(driver)
        gate.set()  # the held request's client is gone: the proxy drops it, S3 never sees it
    assert driver.returncode == -signal.SIGKILL
    return driver


def test_driver_killed_between_adapters_and_manifest(s3_inputs, s3_endpoint, s3_client, undisturbed, tmp_path,
                                                     ray_local, monkeypatch, capsys):
    """The driver (a job's driver on this session's Ray) SIGKILLed while its manifest PUT is in flight: the previous
    night's pointers stay and verify, nothing points at the half-run, its stale lock refuses a plain
    rerun (exit 5), and a rerun with --break-lock finishes the job with the undisturbed bytes."""
    output = output_uri(s3_inputs, "drv")
    manifest_put = rf"^PUT /{BUCKET}/{key_of(output)}runs/[^/]+/manifest\.json"
    # An earlier night, committed with other merge weights: what consumers use now.
    old_config = write_fleet_yaml(tmp_path / "old" / "fleet.yaml", s3_inputs, s3_endpoint, output, weights=(0.6, 0.4))
    old = run_fleet(load_config(old_config), progress=False)
    assert old.exit_code == ExitStatus.OK and old.by_status("committed") == NAMES
    old_published = published_bytes(s3_client, output)
    assert sorted(old_published) == NAMES and old_published != undisturbed  # tonight has work to do
    with FaultProxy(s3_endpoint) as proxy:
        config = write_fleet_yaml(tmp_path / "fleet.yaml", s3_inputs, proxy.endpoint, output)
        driver = _driver_killed_at(proxy, manifest_put, config, ray_local, tmp_path)

        # The half-run: every adapter written, no manifest, no pointer.
        (half_run,) = {path.split("/runs/")[1].split("/")[0] for method, path in proxy.seen
                       if method == "PUT" and path.endswith("/manifest.json")}
        prefix = key_of(output, f"runs/{half_run}/")
        listing = s3_client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        written = {o["Key"].split(f"runs/{half_run}/", 1)[1] for o in listing}
        assert {f"{n}/adapter_model.safetensors" for n in NAMES} <= written and "manifest.json" not in written
        assert pointer_runs(s3_client, output) == {n: old.run_id for n in NAMES}
        assert published_bytes(s3_client, output) == old_published
        verify_output(output, s3_endpoint, monkeypatch, capsys)
        lock = json.loads(s3_client.get_object(Bucket=BUCKET, Key=key_of(output, LOCK))["Body"].read())
        assert lock["pid"] == driver.pid and lock["lease_until"] > time.time() + 60  # looks alive for minutes

        # A plain rerun is refused by the dead run's lock: exit 5, nothing done.
        capsys.readouterr()
        assert main(["fleet", "--config", str(config), "--quiet"]) == ExitStatus.LOCKED
        assert "is locked by another run" in capsys.readouterr().err
        assert pointer_runs(s3_client, output) == {n: old.run_id for n in NAMES}

        # The operator breaks the lock: the rerun finishes the job.
        assert main(["fleet", "--config", str(config), "--quiet", "--break-lock"]) == ExitStatus.OK, capsys.readouterr()
    record = json.loads(s3_client.get_object(Bucket=BUCKET, Key=key_of(output, "status/last_run.json"))["Body"].read())
    assert record["exit_status"] == ExitStatus.OK and record["counts"]["committed"] == len(NAMES)
    assert record["run_id"] not in (None, old.run_id, half_run)
    assert pointer_runs(s3_client, output) == {n: record["run_id"] for n in NAMES}
    assert published_bytes(s3_client, output) == undisturbed
    verify_output(output, s3_endpoint, monkeypatch, capsys)
    assert "Contents" not in s3_client.list_objects_v2(Bucket=BUCKET, Prefix=key_of(output, LOCK))
