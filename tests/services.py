"""Real servers for the service integrations, started on 127.0.0.1 with free ports and stopped by PID: Prometheus'
Pushgateway (Debian's `prometheus-pushgateway`) and an MLflow tracking server (SQLite backend, local artifact
root; its own virtualenv, build/mlflow-server, made by `make test`: MLflow's server pins an older pyarrow)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MLFLOW = REPO / "build" / "mlflow-server" / "bin" / "mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def server(argv: list[str], ready_url: str, log: Path, what: str, within_s: float) -> Iterator[subprocess.Popen]:
    """Start a server, wait until `ready_url` answers 200, and stop it (its process group) when done."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + within_s
            while not _ready(ready_url):
                if proc.poll() is not None:
                    pytest.fail(f"{what} exited with {proc.returncode}: {log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{what} did not answer within {within_s:g} s: {log.read_text()[-2000:]}")
                time.sleep(0.3)
            yield proc
        finally:
            import os
            import signal

            try:
                os.killpg(proc.pid, signal.SIGTERM)  # its own group: the server and the workers it started
                proc.wait(timeout=20)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture(scope="session")
def pushgateway(tmp_path_factory) -> Iterator[str]:
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    if binary is None:
        pytest.fail("prometheus-pushgateway is not installed; `make test` installs it (Debian's package)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("pushgateway") / "pushgateway.log"
    # A persistence file of its own: Debian's build persists to /var/lib/prometheus by default, which would
    # carry one session's groups into the next.
    argv = [binary, f"--web.listen-address=127.0.0.1:{port}", f"--persistence.file={log.parent / 'pushgateway.data'}"]
    with server(argv, f"{url}/-/ready", log, "the Pushgateway", 30):
        yield url


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    if not MLFLOW.exists():
        pytest.fail(f"{MLFLOW} is missing; `make test` makes it (make tracking-server)")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts")]
    with server(argv, f"{url}/health", root / "mlflow.log", "the MLflow server", 180):
        yield url


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """The Pushgateway's /metrics as {(series name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
