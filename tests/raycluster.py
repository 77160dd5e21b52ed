"""Real Ray clusters for the tests, started with `ray start` on 127.0.0.1, and stopped by PID.

Every node gets its own temp dir and its own free ports (the dashboard agent's default port is shared
by every Ray on a machine), so the tests neither collide with another Ray on this machine nor stop it:
`stop()` ends only the processes whose command line names this cluster's temp dirs, and their children.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class RayCluster:
    def __init__(self, base_env: dict[str, str]):
        # Short paths: Ray's unix socket paths must fit in 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="smr-", dir="/tmp"))
        self.token = self.root / "auth_token"
        self.token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        # Ray 2.60 turns token authentication on: every node, driver and client needs the token.
        self.env = dict(base_env, PATH=f"{BIN}{os.pathsep}{base_env.get('PATH', '')}", RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN_PATH=str(self.token))
        self.temp_dirs: list[Path] = []
        self.gcs_port = self.dashboard_port = 0

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _node_env(self, env: dict[str, str] | None) -> dict[str, str]:
        """A node's environment: `env` (default: the cluster's) with the cluster's PATH and token."""
        if env is None:
            return dict(self.env)
        return dict(env, PATH=self.env["PATH"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token))

    def _start(self, args: list[str], node_env: dict[str, str]) -> None:
        temp = self.root / f"n{len(self.temp_dirs)}"
        temp.mkdir()
        self.temp_dirs.append(temp)
        agent_port = free_port()
        cmd = [str(BIN / "ray"), "start", *args, "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
               f"--dashboard-agent-listen-port={agent_port}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
               "--disable-usage-stats"]
        proc = subprocess.run(cmd, env=node_env, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        deadline = time.monotonic() + 60
        while not port_open(agent_port):  # the job API needs this node's agent
            if time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard agent of {temp} did not come up on port {agent_port}")
            time.sleep(0.5)

    def start_head(self, num_cpus: int, env: dict[str, str] | None = None) -> RayCluster:
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self._start(["--head", f"--port={self.gcs_port}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                     f"--ray-client-server-port={free_port()}"], self._node_env(env))
        return self

    def add_node(self, num_cpus: int, env: dict[str, str] | None = None) -> RayCluster:
        self._start([f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}"], self._node_env(env))
        return self

    def wait_for_nodes(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", self.address, "--format=json"],
                                  env=self.env, capture_output=True, text=True, timeout=60)
            if proc.returncode == 0 and sum(node["state"] == "ALIVE" for node in json.loads(proc.stdout)) >= n:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} nodes did not come up: {proc.stdout[-1000:]}{proc.stderr[-1000:]}")
            time.sleep(1)

    def stop(self) -> None:
        """End this cluster's processes (found by their temp dirs) and their children, by PID."""
        procs = _processes_of(self.temp_dirs)
        for p in procs.values():
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)

    def kill_node(self, temp: Path) -> int:
        """SIGKILL every process of the node whose temp dir is `temp` (and their children): a machine that
        vanished. Returns how many processes were killed."""
        procs = _processes_of([temp])
        for p in procs.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(procs.values()), timeout=15)
        return len(procs)


def _processes_of(temp_dirs: list[Path]) -> dict[int, psutil.Process]:
    """The processes whose command line names one of these node temp dirs, and their children."""
    marks = [str(t) for t in temp_dirs]
    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            line = " ".join(p.info["cmdline"] or [])
            if any(m in line for m in marks):
                procs[p.pid] = p
                procs.update({c.pid: c for c in p.children(recursive=True)})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return procs
