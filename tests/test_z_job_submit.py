"""End to end, as on a cluster: `ray start --head`, then `ray job submit` of the nightly job, S3 in and out.

Named to run last: it stops the session's in-process Ray first, and `ray stop` at its end.
"""

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import upload_dir
from safemerge_ray.storage import S3Dir, S3Settings
from safemerge_ray.synthetic import SynthSpec, build_fixture

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    import ray

    ray.shutdown()  # the in-process cluster of the other tests
    # Token authentication, as a real cluster runs it, with this test's own token.
    token = tmp_path / "ray_auth_token"
    token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token))
    gcs, dash = _free_port(), _free_port()
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
                    "--include-dashboard=true", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_nightly_remerge(ray_head, s3_client, s3_endpoint, tmp_path):
    address, env = ray_head
    root = tmp_path / "fx"
    build_fixture(root, SynthSpec(hidden=32, layers=2, heads=4, rank=4, seed=41), n_finetunes=2)
    run = uuid.uuid4().hex[:6]
    for d in sorted((root / "finetuned").iterdir()):
        upload_dir(s3_client, d, "adapters", f"{run}/domains/{d.name}")
    config = {
        "unaligned_model": upload_dir(s3_client, root / "unaligned", "models", f"{run}/base"),
        "aligned_model": upload_dir(s3_client, root / "aligned", "models", f"{run}/chat"),
        "safety_adapter": upload_dir(s3_client, root / "safety", "adapters", f"{run}/safety"),
        "finetuned": [{"prefix": f"s3://adapters/{run}/domains/"}],
        "output": f"s3://adapters/{run}/merged/",
        "s3": {"endpoint_url": s3_endpoint},
    }
    config_path = tmp_path / "nightly.yaml"
    config_path.write_text(yaml.safe_dump(config))

    deadline = time.monotonic() + 60
    while True:  # the dashboard's job API comes up a little after `ray start` returns
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, text=True, timeout=60)
        if probe.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "python", "jobs/nightly_remerge.py", "--config", str(config_path)],
        env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout.lower()
    assert "gsm8k" in proc.stdout and "committed" in proc.stdout

    out = S3Dir(config["output"], S3Settings(endpoint_url=s3_endpoint))
    pointers = {n: json.loads(out.read(f"latest/{n}.json")) for n in ("gsm8k", "medqa")}
    run_ids = {p["run_id"] for p in pointers.values()}
    assert len(run_ids) == 1
    manifest = json.loads(out.read(f"runs/{run_ids.pop()}/manifest.json"))
    assert set(manifest["adapters"]) == {"gsm8k", "medqa"}
    for name, pointer in pointers.items():
        assert out.exists(f"{pointer['path']}adapter_model.safetensors")
