"""The production paths on real `ray start` clusters: two nodes on 127.0.0.1, S3 on SeaweedFS.

- The fleet runs on a worker node (the head has no CPUs for work); S3 credentials reach the workers
  only the documented way (`safemerge-ray submit --env ...`, i.e. the job's runtime env); without them
  the preflight names the node and the cause in one line, and nothing is retried.
- The outputs equal a single-node run's byte for byte.
- The README's cluster walkthrough runs verbatim (taken from the README's text) from a clone, with the
  config in a directory that is not the working directory.

Named to run last: it stops the session's in-process Ray first, and only its own nodes at its end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import upload_dir
from faultproxy import FaultProxy
from raycluster import BIN, RayCluster
from safemerge_ray.io import S3Dir, S3Settings
from safemerge_ray.synthetic import SynthSpec, build_fixture

REPO = Path(__file__).resolve().parents[1]
SECRET = os.environ["AWS_SECRET_ACCESS_KEY"]  # conftest sets the test's own unless the shell has one
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def _without_credentials(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in (*AWS_KEYS, "AWS_SESSION_TOKEN")}


@pytest.fixture(scope="module")
def ray_cluster_two_nodes():
    """A head with no CPUs for work (it hosts the job drivers) and one worker node with 2 CPUs.

    The head's environment has the S3 credentials (as a head node with an instance role would); the
    worker node's has none: workers get them only through the job's runtime env.
    """
    import ray

    ray.shutdown()  # the in-process cluster of the other tests
    cluster = RayCluster(dict(os.environ))
    try:
        cluster.start_head(num_cpus=0)
        cluster.add_node(num_cpus=2, env=_without_credentials(dict(os.environ)))
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def _nodes(cluster: RayCluster) -> dict[str, bool]:
    """node id -> is head"""
    proc = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", cluster.address, "--format=json"],
                          env=cluster.env, capture_output=True, text=True, timeout=60, check=True)
    return {n["node_id"]: n["is_head_node"] for n in json.loads(proc.stdout) if n["state"] == "ALIVE"}


def _s3_fixture(s3_client, tmp_path: Path, endpoint: str) -> tuple[Path, dict]:
    root = tmp_path / "fx"
    build_fixture(root, SynthSpec(hidden=32, layers=2, heads=4, rank=4, seed=41), n_finetunes=3)
    run = uuid.uuid4().hex[:6]
    for d in sorted((root / "finetuned").iterdir()):
        upload_dir(s3_client, d, "adapters", f"{run}/domains/{d.name}")
    config = {
        "unaligned_model": upload_dir(s3_client, root / "unaligned", "models", f"{run}/base"),
        "aligned_model": upload_dir(s3_client, root / "aligned", "models", f"{run}/chat"),
        "safety_adapter": upload_dir(s3_client, root / "safety", "adapters", f"{run}/safety"),
        "finetuned": [{"prefix": f"s3://adapters/{run}/domains/"}],
        "output": f"s3://adapters/{run}/merged/",
        "s3": {"endpoint_url": endpoint},
    }
    return root, config


def _submit(cluster: RayCluster, config: Path, cwd: Path, *extra: str, env: dict | None = None):
    return subprocess.run([str(BIN / "safemerge-ray"), "submit", "--config", str(config), *extra],
                          cwd=cwd, env=env or cluster.env | {"RAY_ADDRESS": cluster.address},
                          capture_output=True, text=True, timeout=420)


def _objects(out: S3Dir, prefix: str) -> dict[str, bytes]:
    keys = out.client.list_objects_v2(Bucket=out.bucket, Prefix=out.prefix + prefix).get("Contents", [])
    return {k["Key"][len(out.prefix + prefix):]: out.client.get_object(Bucket=out.bucket, Key=k["Key"])["Body"].read()
            for k in keys}


def test_two_nodes_over_s3_credentials_only_the_documented_way(ray_cluster_two_nodes, s3_client, s3_endpoint, tmp_path):
    cluster = ray_cluster_two_nodes
    _, raw = _s3_fixture(s3_client, tmp_path, s3_endpoint)
    ops = tmp_path / "ops"
    ops.mkdir()
    config = ops / "fleet.yaml"
    config.write_text(yaml.safe_dump(raw))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = S3Dir(raw["output"], S3Settings(endpoint_url=s3_endpoint))

    # 1. The worker node has no credentials: the preflight says so, one line per input, once.
    _expect_no_credentials(_submit(cluster, Path("../ops/fleet.yaml"), elsewhere), raw, out)

    # 2. With the credentials passed the documented way, the fleet runs, on the worker node only.
    done = _submit(cluster, Path("../ops/fleet.yaml"), elsewhere, "--env", "AWS_ACCESS_KEY_ID",
                   "--env", "AWS_SECRET_ACCESS_KEY", env=cluster.env | {"RAY_ADDRESS": cluster.address})
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    nodes = _nodes(cluster)
    (worker_id,) = [n for n, head in nodes.items() if not head]
    (head_id,) = [n for n, head in nodes.items() if head]
    placed = re.search(r"preflight passed: \d+ worker\(s\) on 1 node\(s\): [\d.]+ \(node ([0-9a-f]{8})\)", text)
    assert placed and worker_id.startswith(placed.group(1)) and not head_id.startswith(placed.group(1)), text[-3000:]
    record = json.loads(out.read("status/last_run.json"))
    assert record["exit_status"] == 0 and record["counts"]["committed"] == 3 and record["run_id"]

    # 3. Byte for byte what a single-node run writes (an in-process Ray on this machine).
    ours = _objects(out, f"runs/{record['run_id']}/")
    _expect_a_single_node_run_writes(ours, raw, ops / "single.yaml", elsewhere, out.settings)

    # The secret travelled in the job's runtime env only: no record, summary or manifest holds it.
    for key, data in {**_objects(out, "status/"), **ours}.items():
        assert SECRET.encode() not in data, key
    assert SECRET not in text

    # 4. Two unchanged and one broken: submit exits with the fleet's 3, where `ray job submit` says 1.
    domains = raw["finetuned"][0]["prefix"][len("s3://adapters/"):]
    s3_client.put_object(Bucket="adapters", Key=f"{domains}medqa/adapter_config.json", Body=b"{not json")
    partial = _submit(cluster, Path("../ops/fleet.yaml"), elsewhere, "--env", "AWS_ACCESS_KEY_ID",
                      "--env", "AWS_SECRET_ACCESS_KEY", "--quiet", "--summary-json", str(tmp_path / "night.json"))
    text = partial.stdout + partial.stderr
    assert partial.returncode == 3, text[-3000:]
    record = json.loads((tmp_path / "night.json").read_text())
    assert record == json.loads(out.read("status/last_run.json"))
    assert record["counts"] == {"adapters": 3, "committed": 0, "unchanged": 2, "held": 0, "failed": 1}
    assert "corrupt adapter_config.json" in record["failed"]["medqa"]

    # 5. A night that overruns --timeout: submit stops the job and says so (exit 1), bounded in time.
    _expect_the_timeout_stops_the_job(cluster, _submit(cluster, Path("../ops/fleet.yaml"), elsewhere, "--timeout",
                                                       "1", "--quiet"))


def _expect_no_credentials(denied: subprocess.CompletedProcess, raw: dict, out: S3Dir) -> None:
    """One line per (node, cause): the five inputs and the output that this node cannot reach; recorded."""
    text = denied.stdout + denied.stderr
    assert denied.returncode == 1, text[-4000:]
    problems = [line.strip() for line in text.splitlines() if line.strip().startswith("worker node ")]
    node = r"worker node [\d.]+ \(node [0-9a-f]{8}\)"  # the node as Ray knows it
    cause = ": no AWS credentials on the worker; give workers an IAM role (IRSA) or see README: credentials"
    assert len(problems) == 2, text[-4000:]  # not repeated by restarts or retries
    assert re.fullmatch(rf"{node} cannot read {re.escape(raw['unaligned_model'])} \(and 5 more\){re.escape(cause)}",
                        problems[0]), problems
    assert re.fullmatch(rf"{node} cannot write to {re.escape(raw['output'])}{re.escape(cause)}", problems[1]), problems
    assert "Traceback" not in text and "RayActorError" not in text
    record = json.loads(out.read("status/last_run.json"))
    assert record["exit_status"] == 1 and "no AWS credentials on the worker" in record["error"]
    assert record["run_id"] is None


def _expect_a_single_node_run_writes(ours: dict[str, bytes], raw: dict, config: Path, cwd: Path,
                                     settings: S3Settings) -> None:
    """The same fleet run by `safemerge-ray fleet` on an in-process Ray writes the same adapters and decisions."""
    single = dict(raw, output=raw["output"].replace("/merged/", "/merged-single/"))
    config.write_text(yaml.safe_dump(single))
    proc = subprocess.run([str(BIN / "safemerge-ray"), "fleet", "--config", str(config), "--quiet",
                           "--address", "local"],
                          cwd=cwd, env=_without_ray(os.environ), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single_out = S3Dir(single["output"], settings)
    single_record = json.loads(single_out.read("status/last_run.json"))
    theirs = _objects(single_out, f"runs/{single_record['run_id']}/")
    adapters = {k: v for k, v in ours.items() if k.count("/") == 1}
    assert len(adapters) == 6 and adapters == {k: v for k, v in theirs.items() if k.count("/") == 1}
    assert ours["decisions.parquet"] == theirs["decisions.parquet"]


def _expect_the_timeout_stops_the_job(cluster: RayCluster, late: subprocess.CompletedProcess) -> None:
    text = late.stdout + late.stderr
    assert late.returncode == 1 and "did not end within 1 s (--timeout); asked Ray to stop it" in text, text[-3000:]
    (job_id,) = re.findall(r"submitted (safemerge-\S+) to", text)
    for _ in range(30):
        status = subprocess.run([str(BIN / "ray"), "job", "status", job_id, "--address", cluster.address],
                                env=cluster.env, capture_output=True, text=True, timeout=60).stdout.lower()
        if any(word in status for word in ("stopped", "failed", "succeeded")):
            break
        time.sleep(1)
    assert "was stopped" in status, status


def _without_ray(env) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in ("RAY_ADDRESS",)}


def _readme_walkthrough() -> list[str]:
    """The README's local-cluster walkthrough, as the lines a user types."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- cluster-walkthrough -->\s*```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert match, "README.md lost its cluster walkthrough block"
    return [line for line in match.group(1).splitlines() if line.strip() and not line.startswith("#")]


def _clone(tmp_path: Path) -> Path:
    """What a user has after `git clone`: the tracked files."""
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / name)
    return clone


def test_readme_cluster_walkthrough_verbatim(ray_cluster_two_nodes, tmp_path):
    cluster = ray_cluster_two_nodes
    lines = _readme_walkthrough()
    assert any(line.startswith("ray job submit ") for line in lines)
    assert any(line.startswith("safemerge-ray submit ") for line in lines)
    clone = _clone(tmp_path)
    env = _without_credentials(cluster.env)
    script = ["set -euo pipefail"]
    for line in lines:
        if line.startswith("ray start"):
            continue  # the test's cluster stands in for it (its ports are free ones, not the defaults)
        if line.startswith("export RAY_ADDRESS="):
            script.append(f"export RAY_ADDRESS={cluster.address}")
            continue
        script.append(line)
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=540)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-5000:]
    assert "Traceback" not in text
    # submit repaired the fleet, submit found nothing to do, `ray job submit` repaired Ray's copies of it.
    merged = clone / "merged"
    records = [json.loads(p.read_text()) for p in sorted((merged / "status" / "history").iterdir())]
    assert [(r["exit_status"], r["counts"]["committed"], r["counts"]["unchanged"]) for r in records] == \
        [(0, 3, 0), (0, 0, 3), (0, 3, 0)], records
    assert records[1]["run_id"] is None and records[0]["run_id"] and records[2]["run_id"]
    assert "job safemerge-" in text and "exit status 0 (adapters 3, committed 0" in text
    pointers = sorted((merged / "latest").glob("*.json"))
    assert len(pointers) == 3
    for p in pointers:
        pointer = json.loads(p.read_text())
        assert pointer["run_id"] == records[2]["run_id"]
        assert (merged / pointer["path"] / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------- a node lost mid-run


def _node_of(pid: int, cluster: RayCluster) -> Path:
    """The temp dir of the cluster node whose raylet is an ancestor of process `pid`."""
    for parent in psutil.Process(pid).parents():
        line = " ".join(parent.cmdline())
        for temp in cluster.temp_dirs:
            if str(temp) in line:
                return temp
    raise AssertionError(f"process {pid} belongs to no node of this cluster")


@pytest.mark.slow
def test_a_node_lost_mid_run(ray_cluster_two_nodes, s3_client, s3_endpoint, tmp_path):
    """A second worker node joins; one worker node dies (every process SIGKILLed) while a worker on it is
    scoring. Ray notices, restarts that worker on the surviving node and retries its task: the run
    commits every adapter, byte for byte what an undisturbed run writes, and every pointer verifies."""
    cluster = ray_cluster_two_nodes
    cluster.add_node(num_cpus=2, env=_without_credentials(dict(os.environ)))
    cluster.wait_for_nodes(3)
    _, raw = _s3_fixture(s3_client, tmp_path, s3_endpoint)
    raw["ray"] = {"actors": 2, "cpus_per_actor": 1}  # room for both on one surviving node
    creds = ["--env", "AWS_ACCESS_KEY_ID", "--env", "AWS_SECRET_ACCESS_KEY", "--quiet"]
    calm = tmp_path / "calm.yaml"
    calm.write_text(yaml.safe_dump(dict(raw, output=raw["output"].replace("/merged/", "/calm/"))))
    assert _submit(cluster, calm, tmp_path, *creds).returncode == 0

    run_prefix = raw["unaligned_model"].rsplit("/", 2)[0][len("s3://models/"):]

    def tensor_read(method, path, headers):  # a model weight's data, not its header: scoring
        start = headers.get("range", "bytes=-1-").split("=", 1)[1].split("-", 1)[0]
        return method == "GET" and path.startswith(f"/models/{run_prefix}/") and \
            path.endswith(".safetensors") and start.isdigit() and int(start) > 8

    with FaultProxy(s3_endpoint) as proxy:
        faulty = tmp_path / "faulty.yaml"
        faulty.write_text(yaml.safe_dump(dict(raw, s3={"endpoint_url": proxy.endpoint})))
        gate = proxy.hold(tensor_read)
        with ThreadPoolExecutor(max_workers=1) as pool:
            job = pool.submit(_submit, cluster, faulty, tmp_path, *creds[:-1])  # with the job's log
            try:
                assert proxy.wait_for(tensor_read, timeout=120), proxy.seen[-10:]
                peer = proxy.peer_of(tensor_read)
                worker = next(p for p in psutil.process_iter() if _has_port(p, peer[1]))
                assert cluster.kill_node(_node_of(worker.pid, cluster)) > 3
            finally:
                gate.set()
            done = job.result(timeout=300)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    assert 1 <= text.count("a worker was lost") <= 4 and "resubmitting its tasks to others" in text, text[-4000:]
    settings = S3Settings(endpoint_url=s3_endpoint)
    out, calm_out = S3Dir(raw["output"], settings), S3Dir(raw["output"].replace("/merged/", "/calm/"), settings)
    record, calm_record = (json.loads(d.read("status/last_run.json")) for d in (out, calm_out))
    assert record["counts"]["committed"] == 3 and record["exit_status"] == 0
    ours = _objects(out, f"runs/{record['run_id']}/")
    theirs = _objects(calm_out, f"runs/{calm_record['run_id']}/")
    adapters = {k: v for k, v in ours.items() if k.count("/") == 1}
    assert len(adapters) == 6 and adapters == {k: v for k, v in theirs.items() if k.count("/") == 1}
    env = dict(os.environ, AWS_ENDPOINT_URL=s3_endpoint)
    check = subprocess.run([str(BIN / "safemerge-ray"), "verify", raw["output"]], env=env, capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.count("ok ") == 3, check.stdout + check.stderr


def _has_port(p: psutil.Process, port: int) -> bool:
    try:
        return any(c.laddr and c.laddr.port == port for c in p.net_connections(kind="tcp"))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
