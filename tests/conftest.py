import shutil

import pytest

from safemerge_ray.synthetic import SynthSpec, build_fixture

ARCHS = ("llama", "qwen2")


# --------------------------------------------------------------------------- markers
# Markers follow from what a test uses (its fixtures, transitively, and its module), so they cannot drift:
# `pytest -m "not ray and not s3 and not cluster and not k8s and not prometheus"` (`make test-fast`) runs the fast
# unit tests.
MARKERS = {  # registered here, beside the rule that sets them (the others are in pyproject.toml)
    "prometheus": "runs promtool or a Pushgateway (Debian's prometheus, prometheus-pushgateway: make prometheus-tools)",
}


def pytest_configure(config):
    for name, what in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")


def _markers_for(item) -> set[str]:
    names = set(getattr(item, "fixturenames", ()))
    marks = set()
    if "ray_local" in names:
        marks.add("ray")
    if names & {"s3_endpoint", "s3_client"}:
        marks.add("s3")
    if any(n.startswith(("ray_head", "ray_cluster")) for n in names):
        marks.add("cluster")
    if item.path.name.startswith("test_k8s"):
        marks.add("k8s")
    if item.path.name == "test_alerts.py" or "pushgateway" in names:
        marks.add("prometheus")
    return marks


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in sorted(_markers_for(item)):
            item.add_marker(name)


@pytest.fixture(autouse=True)
def _text_logs():
    """The log format is process-wide (as in a CLI process); each test starts with the default's text."""
    from safemerge_ray.progress import configure

    configure("text")
    yield


@pytest.fixture(scope="session")
def fixtures_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fixtures")


def _fixture(root, key, spec, **kw):
    path = root / key
    if not path.exists():
        build_fixture(path, spec, **kw)
    return path


@pytest.fixture(scope="session", params=ARCHS)
def pair(request, fixtures_root):
    """A tiny model pair (Llama-style, and Qwen2-style with q/k/v biases) with a safety adapter and one fine-tune."""
    spec = SynthSpec(arch=request.param, hidden=32, layers=2, heads=4, rank=4, seed=3)
    return _fixture(fixtures_root, f"pair-{request.param}", spec)


@pytest.fixture(scope="session")
def fleet_source(fixtures_root):
    """A Llama fixture with 4 fine-tunes (gsm8k, legal, medqa, support): a small fleet."""
    return _fixture(fixtures_root, "fleet4", SynthSpec(hidden=32, layers=2, heads=4, rank=4, seed=21), n_finetunes=4)


@pytest.fixture
def local_fleet(fleet_source, tmp_path):
    """A private copy of that fleet with its `fleet.yaml` (paths relative to it, output `merged`)."""
    from safemerge_ray.synthetic import write_fleet_config

    root = tmp_path / "fleet"
    shutil.copytree(fleet_source, root)
    write_fleet_config(root)
    return root


@pytest.fixture
def pristine(fixtures_root, tmp_path):
    """A private copy of a Llama fixture that a test may damage."""
    src = _fixture(fixtures_root, "pristine", SynthSpec(hidden=32, layers=2, heads=4, rank=4, seed=5))
    dst = tmp_path / "fx"
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- Ray and S3 (SeaweedFS)

import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

# Test-only credentials for the local S3 server; set before any Ray worker starts so workers inherit
# them through the standard AWS chain, as they would from an instance profile or IRSA on a cluster.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "safemerge-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "safemerge-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # never look for a cloud IAM here

S3_PORT = 8333


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1, started for this test session and stopped after it."""
    import shutil

    weed = shutil.which("weed") or str(Path(os.sys.executable).with_name("weed"))
    if _port_open(S3_PORT):
        pytest.fail(f"port {S3_PORT} is already in use; stop the other S3 server first")
    data = tmp_path_factory.mktemp("seaweedfs")
    log = open(data / "weed.log", "wb")
    proc = subprocess.Popen([weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                             "-master.telemetry=false", "-admin.ui=false"], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{S3_PORT}"
    try:
        deadline = time.monotonic() + 90
        client = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"weed mini exited with {proc.returncode}; see {data / 'weed.log'}")
            if _port_open(S3_PORT):
                import boto3

                client = boto3.client("s3", endpoint_url=endpoint)
                try:
                    client.list_buckets()
                    break
                except Exception:
                    pass
            time.sleep(0.5)
        else:
            pytest.fail("SeaweedFS S3 did not come up within 90 s")
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="session")
def s3_client(s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)


def upload_dir(client, local: Path, bucket: str, prefix: str) -> str:
    """Copy a local tree to s3://bucket/prefix/ (the test's stand-in for an upload pipeline)."""
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix.strip('/')}/{path.relative_to(local).as_posix()}")
    return f"s3://{bucket}/{prefix.strip('/')}/"


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster for the session (2 CPUs, as on this machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# --------------------------------------------------------------------------- service integrations (tests/services.py)
# and the fault tests' fleet (tests/faultfleet.py, which imports upload_dir from here)

from faultfleet import s3_inputs, undisturbed  # noqa: E402, F401
from services import mlflow_server, pushgateway  # noqa: E402, F401
