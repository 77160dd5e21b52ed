"""The fault tests' fleet (test_faults.py, test_faults_s3.py): the 4-adapter fleet uploaded to SeaweedFS,
its config, an undisturbed run's published bytes, and how the output is checked the way a consumer uses it.

Its session-scoped fixtures `s3_inputs` and `undisturbed` are made known to pytest by tests/conftest.py.
"""

from __future__ import annotations

import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import upload_dir
from safemerge_ray.cli import main
from safemerge_ray.errors import ExitStatus
from safemerge_ray.fleet import run_fleet
from safemerge_ray.fleet.config import load_config

NAMES = ["gsm8k", "legal", "medqa", "support"]
BUCKET = "faults"
RUN_TIMEOUT_S = 120  # one tiny fleet run takes seconds; a stuck one fails the test instead of hanging it


@pytest.fixture(scope="session")  # every fault test file shares one upload and one reference run
def s3_inputs(fleet_source, s3_client):
    """The 4-adapter fleet uploaded once: models, safety adapter, fine-tunes."""
    run = uuid.uuid4().hex[:6]
    uris = {role: upload_dir(s3_client, fleet_source / role, BUCKET, f"{run}/{role}")
            for role in ("unaligned", "aligned", "safety")}
    for name in NAMES:
        upload_dir(s3_client, fleet_source / "finetuned" / name, BUCKET, f"{run}/finetuned/{name}")
    uris["finetuned"] = f"s3://{BUCKET}/{run}/finetuned/"
    uris["run"] = run
    return uris


def write_fleet_yaml(path: Path, inputs: dict, endpoint: str, output: str, weights=(0.8, 0.2), attempts: int = 8,
                     **extra) -> Path:
    raw = {"unaligned_model": inputs["unaligned"], "aligned_model": inputs["aligned"],
           "safety_adapter": inputs["safety"], "finetuned": [{"prefix": inputs["finetuned"]}], "output": output,
           "merge": {"tau": 0.35, "weights": list(weights), "method": "linear"},
           "s3": {"endpoint_url": endpoint, "max_attempts": attempts}, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def output_uri(inputs: dict, label: str) -> str:
    return f"s3://{BUCKET}/{inputs['run']}/out-{label}-{uuid.uuid4().hex[:4]}/"


def key_of(uri: str, name: str = "") -> str:
    return uri[len(f"s3://{BUCKET}/"):] + name


def published_bytes(s3_client, output: str) -> dict[str, dict[str, bytes]]:
    """adapter -> {file: bytes} for every latest/ pointer: what consumers get."""
    def get(name: str) -> bytes:
        return s3_client.get_object(Bucket=BUCKET, Key=key_of(output, name))["Body"].read()

    listing = s3_client.list_objects_v2(Bucket=BUCKET, Prefix=key_of(output, "latest/")).get("Contents", [])
    published = {}
    for obj in listing:
        name = obj["Key"].rsplit("/", 1)[1].removesuffix(".json")
        pointer = json.loads(get(f"latest/{name}.json"))
        published[name] = {f: get(f"{pointer['path']}{f}")
                           for f in ("adapter_config.json", "adapter_model.safetensors")}
    return published


def pointer_runs(s3_client, output: str) -> dict[str, str]:
    listing = s3_client.list_objects_v2(Bucket=BUCKET, Prefix=key_of(output, "latest/")).get("Contents", [])
    return {o["Key"].rsplit("/", 1)[1].removesuffix(".json"):
            json.loads(s3_client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read())["run_id"] for o in listing}


def verify_output(output: str, endpoint: str, monkeypatch, capsys) -> None:
    """`safemerge-ray verify OUTPUT`: every pointer names an adapter whose bytes match its manifest."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    capsys.readouterr()
    code = main(["verify", output])
    text = capsys.readouterr().out
    assert code == 0, text
    assert text.count("ok ") == len(NAMES), text


@pytest.fixture(scope="session")  # every fault test file shares one upload and one reference run
def undisturbed(s3_inputs, s3_endpoint, s3_client, tmp_path_factory, ray_local):
    """The published bytes of a run with no faults (straight to S3, no proxy)."""
    output = output_uri(s3_inputs, "base")
    path = tmp_path_factory.mktemp("base") / "fleet.yaml"
    config = load_config(write_fleet_yaml(path, s3_inputs, s3_endpoint, output))
    report = run_fleet(config, progress=False)
    assert report.exit_code == ExitStatus.OK and report.by_status("committed") == NAMES
    published = published_bytes(s3_client, output)
    assert sorted(published) == NAMES
    return published


def run_in_thread(config):
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(run_fleet, config, False)
    pool.shutdown(wait=False)
    return future


def _range_start(headers: dict) -> int:
    value = headers.get("range", "")
    if not value.startswith("bytes="):
        return -1
    return int(value[len("bytes="):].split("-", 1)[0])


def tensor_read_matcher(inputs: dict):
    model = f"/{BUCKET}/{inputs['run']}/(un)?aligned/model.safetensors"

    def match(method, path, headers):  # not a header read (bytes=0-7, bytes=8-...): scoring
        return method == "GET" and re.fullmatch(model, path) is not None and _range_start(headers) > 8
    return match
